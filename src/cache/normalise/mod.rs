//! The canonical form of a question, for the semantic cache: the ordinary variation users
//! type is written one way before a question is embedded ([`super::embed`],
//! [`super::local_embed`]) and before the false-hit guards compare two questions
//! ([`super::guards`]), so the embedder sees the same words and the guards agree ("three" and
//! "3" are one number to the `numbers` guard; "3" and "4" still are not).
//!
//! What is rewritten, word by word, in place (everything else, punctuation and case included,
//! is kept as it is):
//! - number words → digits: "three" → "3", "twenty-one" → "21", "a hundred" → "a 100",
//!   "third" → "3rd" ("one" as a pronoun — "which one", "one of" — stays);
//! - compounds → one word: "e-mail", "e mail" → "email", "log in" → "login" (a table for words
//!   apart; a hyphen also joins into any known word: "on-line" → "online");
//! - regular plurals → singular ("files" → "file", "boxes" → "box", "puppies" → "puppy"),
//!   checked against the vocabulary, never "news", "series", "physics" or "glasses";
//! - British → American spelling: a table ("grey", "programme", "cheque", "travelling") and
//!   patterns (-our, -re, -ence, -ise/-isation, -yse) that apply only when they turn an unknown
//!   word into a known one ("organise" → "organize", never "promise" → "promize");
//! - one-letter typos: a word of five letters or more that the vocabulary lacks, one edit
//!   from exactly one known word ("photosynthsis" → "photosynthesis").
//!
//! Never rewritten: names (a capitalised word that does not start a sentence), acronyms and
//! mixed case ("US", "iPhone", `camelCase`), code (`parse_config`, `os.path`, `call()`,
//! paths), words with digits or apostrophes, and anything inside quotes or backticks — the
//! guards compare those exactly.

mod lexicon;
mod numbers;
#[cfg(test)]
mod tests;

pub use lexicon::{known, one_edit, plural_only};

/// A word of the text: its byte span and whether the rules may rewrite it.
#[derive(Debug, Clone, Copy)]
struct Word {
    start: usize,
    end: usize,
    editable: bool,
    sentence_start: bool,
}

/// Characters that glue a word to code, a path or an address.
const GLUE: &str = "_/\\@#$%=<>`~|^&*+[]{}";

/// The canonical form of `text` (see the module doc).
pub fn canonical(text: &str) -> String {
    let words = words(text);
    let lower: Vec<String> = words
        .iter()
        .map(|w| text[w.start..w.end].to_lowercase())
        .collect();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut i = 0;
    while i < words.len() {
        let Some((replacement, used)) = rewrite(text, &words, &lower, i) else {
            i += 1;
            continue;
        };
        let (first, last) = (words[i], words[i + used - 1]);
        out.push_str(&text[copied..first.start]);
        let original = &text[first.start..first.end];
        if original.starts_with(char::is_uppercase) {
            let mut chars = replacement.chars();
            out.extend(chars.next().into_iter().flat_map(char::to_uppercase));
            out.push_str(chars.as_str());
        } else {
            out.push_str(&replacement);
        }
        copied = last.end;
        i += used;
    }
    out.push_str(&text[copied..]);
    out
}

/// The rewrite starting at word `i`, with how many words it replaces (`None`: left as it is).
fn rewrite(text: &str, words: &[Word], lower: &[String], i: usize) -> Option<(String, usize)> {
    if !words[i].editable {
        return None;
    }
    // The run of editable words joined by a space or a hyphen from `i` on.
    let mut run = vec![lower[i].as_str()];
    let mut hyphens = Vec::new();
    for j in i + 1..words.len() {
        let gap = &text[words[j - 1].end..words[j].start];
        if !words[j].editable || !(gap == "-" || gap == " ") {
            break;
        }
        run.push(lower[j].as_str());
        hyphens.push(gap == "-");
    }
    let before = i
        .checked_sub(1)
        .filter(|_| !words[i].sentence_start)
        .map(|p| lower[p].as_str());
    if let Some(found) = numbers::parse(&run, before) {
        return Some(found);
    }
    // A capitalised word here starts a sentence, and may be a name: spelling only.
    let capital = text[words[i].start..].starts_with(char::is_uppercase);
    if let Some(second) = run.get(1) {
        let joined = word_rules(&format!("{}{second}", run[0]), false);
        let known_compound = lexicon::COMPOUNDS.contains(&joined.as_str());
        let hyphen_join = hyphens[0] && run[0] != "re" && second.len() >= 2 && known(&joined);
        if known_compound || hyphen_join {
            return Some((joined, 2));
        }
    }
    let w = if capital {
        lexicon::american(run[0])
    } else {
        word_rules(run[0], true)
    };
    (w != run[0]).then_some((w, 1))
}

/// Spelling, plural and (when `typos`) typo rules on one lower-case word.
fn word_rules(w: &str, typos: bool) -> String {
    let w = lexicon::singular(&lexicon::american(w));
    if !typos || known(&w) {
        return w;
    }
    match lexicon::corrected(&w) {
        Some(fixed) => lexicon::singular(&fixed),
        None => w,
    }
}

/// The words of `text` (runs of letters, digits, `_` and inner apostrophes), each marked
/// editable or not.
fn words(text: &str) -> Vec<Word> {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let quoted = quoted_spans(&chars);
    let is_word = |k: usize| {
        let c = chars[k].1;
        c.is_alphanumeric()
            || c == '_'
            || (matches!(c, '\'' | '’')
                && k > 0
                && chars[k - 1].1.is_alphanumeric()
                && chars.get(k + 1).is_some_and(|n| n.1.is_alphanumeric()))
    };
    let mut out = Vec::new();
    let mut k = 0;
    let mut sentence_start = true;
    while k < chars.len() {
        if !is_word(k) {
            if matches!(chars[k].1, '.' | '?' | '!' | '\n' | ':') {
                sentence_start = true;
            }
            k += 1;
            continue;
        }
        let first = k;
        while k < chars.len() && is_word(k) {
            k += 1;
        }
        let start = chars[first].0;
        let end = chars.get(k).map_or(text.len(), |c| c.0);
        let token = &text[start..end];
        let glued = |at: Option<usize>, beyond: Option<usize>| {
            at.and_then(|a| chars.get(a)).is_some_and(|&(_, c)| {
                GLUE.contains(c)
                    || (matches!(c, '.' | ':' | '(')
                        && beyond
                            .and_then(|b| chars.get(b))
                            .is_some_and(|n| n.1.is_alphanumeric() || c == '('))
            })
        };
        let code = glued(first.checked_sub(1), first.checked_sub(2))
            || glued(Some(k), Some(k + 1))
            || chars.get(k).is_some_and(|c| c.1 == '(');
        let mut letters = token.chars();
        let head = letters.next().unwrap_or(' ');
        let plain_case =
            letters.all(|c| !c.is_uppercase()) && (head.is_lowercase() || sentence_start);
        let editable = plain_case
            && !code
            && token.chars().all(char::is_alphabetic)
            && !quoted.iter().any(|(a, b)| (*a..*b).contains(&first));
        out.push(Word {
            start,
            end,
            editable,
            sentence_start,
        });
        sentence_start = false;
    }
    out
}

/// Char positions inside quotes: double, typographic and backticks; single quotes when they
/// open after a space and close before one (not apostrophes).
fn quoted_spans(chars: &[(usize, char)]) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut k = 0;
    while k < chars.len() {
        let close = match chars[k].1 {
            '"' => Some('"'),
            '“' => Some('”'),
            '‘' => Some('’'),
            '`' => Some('`'),
            '\'' if k == 0 || !chars[k - 1].1.is_alphanumeric() => Some('\''),
            _ => None,
        };
        let end = close.and_then(|c| {
            (k + 1..chars.len()).find(|&e| {
                chars[e].1 == c
                    && (c != '\'' || chars.get(e + 1).is_none_or(|n| !n.1.is_alphanumeric()))
            })
        });
        match end {
            Some(e) => {
                spans.push((k, e));
                k = e + 1;
            }
            None => k += 1,
        }
    }
    spans
}
