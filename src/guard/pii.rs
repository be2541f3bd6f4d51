//! PII redaction before anything leaves for a provider, and restoration of the reply.
//!
//! Detectors (each a pattern, and where a check digit exists, the check):
//! e-mail addresses; phone numbers (international `+CC …`, or grouped `(555) 123-4567` /
//! `555-123-4567`: a bare run of digits such as an order number is not a phone); payment cards
//! (13–19 digits, Luhn); IBANs (mod-97); Indian Aadhaar numbers (12 digits, Verhoeff) and PAN
//! (`ABCDE1234F`); IPv4 and IPv6 addresses; API keys (`sk-…`, `AKIA…`, `ghp_…`, `xox…-`) and
//! bearer tokens. Each value becomes a typed placeholder (`<EMAIL_1>`), the same one for the same
//! value throughout a conversation ([`Vault`]); the reply's placeholders are put back before the
//! client sees them ([`Restorer`], which copes with a placeholder split across deltas).

use std::collections::HashMap;
use std::sync::LazyLock;

use regex::{Regex, RegexSet};
use serde::{Deserialize, Serialize};

/// What a route or key does with PII.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PiiMode {
    Off,
    #[default]
    Redact,
    Block,
}

struct Detector {
    kind: &'static str,
    pattern: Regex,
    check: fn(&str) -> bool,
}

fn always(_: &str) -> bool {
    true
}

/// The detectors, and all their patterns in one set: one pass over a text tells which
/// detectors can match at all (most texts carry no PII, and then no detector runs).
struct Detectors {
    list: Vec<Detector>,
    any: RegexSet,
}

#[allow(clippy::expect_used)] // ok: constant patterns, proven by the unit tests
static DETECTORS: LazyLock<Detectors> = LazyLock::new(|| {
    let list = detectors();
    let any = RegexSet::new(list.iter().map(|d| d.pattern.as_str())).expect("valid patterns"); // ok: constant patterns, tested
    Detectors { list, any }
});

#[allow(clippy::expect_used)] // ok: constant patterns, proven by the unit tests
fn detectors() -> Vec<Detector> {
    let d = |kind, pattern: &str, check| Detector {
        kind,
        pattern: Regex::new(pattern).expect("valid pattern"), // ok: constant patterns, tested
        check,
    };
    vec![
        d("BEARER", r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{16,}", always),
        d(
            "API_KEY",
            r"\b(?:sk|pk|rk)-[A-Za-z0-9_-]{16,}|\bAKIA[0-9A-Z]{16}\b|\bgh[pousr]_[A-Za-z0-9]{30,}|\bxox[abprs]-[A-Za-z0-9-]{10,}",
            always,
        ),
        d(
            "EMAIL",
            r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b",
            always,
        ),
        d(
            "IBAN",
            r"\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,30}\b",
            iban_ok,
        ),
        d("CARD", r"\b[2-6][0-9](?:[ -]?[0-9]){11,17}\b", luhn_ok),
        d(
            "AADHAAR",
            r"\b[2-9][0-9]{3}[ -]?[0-9]{4}[ -]?[0-9]{4}\b",
            verhoeff_ok,
        ),
        d("PAN", r"\b[A-Z]{3}[PCHFATBLJG][A-Z][0-9]{4}[A-Z]\b", always),
        d(
            "IP",
            r"\b(?:(?:25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])\.){3}(?:25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])\b",
            always,
        ),
        d(
            "IP",
            r"(?i)\b[0-9a-f]{0,4}(?::[0-9a-f]{0,4}){2,7}\b",
            ipv6_ok,
        ),
        d(
            "PHONE",
            r"\+[0-9]{1,3}[ .-]?\(?[0-9]{1,4}\)?(?:[ .-]?[0-9]{2,4}){2,4}\b|\([0-9]{3}\)[ .-]?[0-9]{3}[ .-][0-9]{4}\b|\b[0-9]{3}[ .-][0-9]{3}[ .-][0-9]{4}\b",
            phone_ok,
        ),
    ]
}

static PLACEHOLDER: LazyLock<Regex> = LazyLock::new(|| {
    #[allow(clippy::expect_used)] // ok: a constant pattern
    Regex::new(r"<[A-Z_]+_\d+>").expect("valid pattern") // ok: constant pattern
});

/// Placeholders of one conversation: the same value always gets the same placeholder.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vault {
    by_value: HashMap<String, String>,
    by_placeholder: HashMap<String, String>,
    counts: HashMap<String, u32>,
}

impl Vault {
    fn placeholder(&mut self, kind: &str, value: &str) -> String {
        if let Some(p) = self.by_value.get(value) {
            return p.clone();
        }
        let n = self.counts.entry(kind.to_owned()).or_insert(0);
        *n += 1;
        let p = format!("<{kind}_{n}>");
        self.by_value.insert(value.to_owned(), p.clone());
        self.by_placeholder.insert(p.clone(), value.to_owned());
        p
    }

    /// `text` with every detected value replaced; answers the kinds found.
    pub fn redact(&mut self, text: &str) -> (String, Vec<&'static str>) {
        // Values seen before are replaced wherever they stand, whatever surrounds them (a
        // restored reply may put one where no detector would find it again).
        let mut known: Vec<(&String, &String)> = self.by_value.iter().collect();
        known.sort_by_key(|(v, _)| std::cmp::Reverse(v.len()));
        let mut out = text.to_owned();
        for (value, placeholder) in known {
            if out.contains(value.as_str()) {
                out = out.replace(value.as_str(), placeholder);
            }
        }
        let mut kinds = Vec::new();
        // Which detectors match the text as it stands: asked again after each replacement,
        // so a detector is skipped only when it would have found nothing.
        let mut candidates = DETECTORS.any.matches(&out);
        for (i, d) in DETECTORS.list.iter().enumerate() {
            if !candidates.matched(i) {
                continue;
            }
            if let Some(replaced) = self.apply(d, &out, &mut kinds) {
                out = replaced;
                candidates = DETECTORS.any.matches(&out);
            }
        }
        (out, kinds)
    }

    /// `text` with what detector `d` finds replaced, if it finds anything; notes its kind.
    fn apply(&mut self, d: &Detector, text: &str, kinds: &mut Vec<&'static str>) -> Option<String> {
        let mut replaced = String::new();
        let mut last = 0;
        for m in d.pattern.find_iter(text) {
            let Some(value) = checked_prefix(m.as_str().trim(), d.check) else {
                continue;
            };
            if PLACEHOLDER.is_match(value) {
                continue;
            }
            if replaced.capacity() == 0 {
                replaced.reserve(text.len() + 16);
            }
            replaced.push_str(&text[last..m.start()]);
            replaced.push_str(&self.placeholder(d.kind, value));
            last = m.start() + m.as_str().find(value).unwrap_or(0) + value.len();
            if !kinds.contains(&d.kind) {
                kinds.push(d.kind);
            }
        }
        (last > 0).then(|| {
            replaced.push_str(&text[last..]);
            replaced
        })
    }

    /// The original of a placeholder, if this vault made it.
    pub fn original(&self, placeholder: &str) -> Option<&str> {
        self.by_placeholder.get(placeholder).map(String::as_str)
    }

    pub fn is_empty(&self) -> bool {
        self.by_value.is_empty()
    }

    /// How many values it replaces; it only ever grows.
    pub fn len(&self) -> usize {
        self.by_value.len()
    }
}

/// The kinds of PII in `text` (for `block` mode).
pub fn detect(text: &str) -> Vec<&'static str> {
    Vault::default().redact(text).1
}

/// Puts originals back into a streamed reply. Text that may be the start of a placeholder is
/// held back until it is complete (or proven not to be one).
#[derive(Debug, Default)]
pub struct Restorer {
    pending: String,
}

/// A placeholder is never longer than this; anything longer is plain text.
const MAX_PLACEHOLDER: usize = 32;

impl Restorer {
    /// Feeds a delta; answers the text that can be sent now.
    pub fn push(&mut self, vault: &Vault, delta: &str) -> String {
        self.pending.push_str(delta);
        let restored = restore(vault, &self.pending);
        // Hold back an unterminated '<…' tail that could still become a placeholder.
        let hold_from = restored.rfind('<').filter(|&i| {
            let tail = &restored[i + 1..];
            tail.len() < MAX_PLACEHOLDER
                && tail
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        });
        match hold_from {
            Some(i) => {
                self.pending = restored[i..].to_owned();
                restored[..i].to_owned()
            }
            None => {
                self.pending.clear();
                restored
            }
        }
    }

    /// The text still held back, at the end of the reply.
    pub fn finish(&mut self, vault: &Vault) -> String {
        let rest = restore(vault, &self.pending);
        self.pending.clear();
        rest
    }
}

fn restore(vault: &Vault, text: &str) -> String {
    PLACEHOLDER
        .replace_all(text, |c: &regex::Captures<'_>| {
            let p = &c[0];
            vault
                .original(p)
                .map_or_else(|| p.to_owned(), str::to_owned)
        })
        .into_owned()
}

/// The longest prefix of `candidate`, ending at a group boundary, that passes `check`: a
/// greedy match such as a card number followed by a CVV fails its check digit as a whole.
fn checked_prefix(candidate: &str, check: fn(&str) -> bool) -> Option<&str> {
    if check(candidate) {
        return Some(candidate);
    }
    candidate
        .char_indices()
        .rev()
        .filter(|(_, c)| *c == ' ' || *c == '-')
        .map(|(i, _)| candidate[..i].trim_end())
        .find(|prefix| !prefix.is_empty() && check(prefix))
}

fn digits(s: &str) -> Vec<u32> {
    s.chars().filter_map(|c| c.to_digit(10)).collect()
}

/// The Luhn check of payment card numbers.
pub fn luhn_ok(s: &str) -> bool {
    let d = digits(s);
    if !(13..=19).contains(&d.len()) {
        return false;
    }
    let sum: u32 = d
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &x)| {
            if i % 2 == 1 {
                if x * 2 > 9 {
                    x * 2 - 9
                } else {
                    x * 2
                }
            } else {
                x
            }
        })
        .sum();
    sum % 10 == 0
}

/// The ISO 13616 mod-97 check of IBANs.
pub fn iban_ok(s: &str) -> bool {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    if !s.is_ascii() || !(15..=34).contains(&s.len()) {
        return false;
    }
    let (head, tail) = s.split_at(4);
    let mut rem: u32 = 0;
    for c in tail.chars().chain(head.chars()) {
        let v = match c.to_digit(36) {
            Some(v) => v,
            None => return false,
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    rem == 1
}

/// The Verhoeff check of Aadhaar numbers.
pub fn verhoeff_ok(s: &str) -> bool {
    const D: [[u8; 10]; 10] = [
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
        [1, 2, 3, 4, 0, 6, 7, 8, 9, 5],
        [2, 3, 4, 0, 1, 7, 8, 9, 5, 6],
        [3, 4, 0, 1, 2, 8, 9, 5, 6, 7],
        [4, 0, 1, 2, 3, 9, 5, 6, 7, 8],
        [5, 9, 8, 7, 6, 0, 4, 3, 2, 1],
        [6, 5, 9, 8, 7, 1, 0, 4, 3, 2],
        [7, 6, 5, 9, 8, 2, 1, 0, 4, 3],
        [8, 7, 6, 5, 9, 3, 2, 1, 0, 4],
        [9, 8, 7, 6, 5, 4, 3, 2, 1, 0],
    ];
    const P: [[u8; 10]; 8] = [
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
        [1, 5, 7, 6, 2, 8, 3, 0, 9, 4],
        [5, 8, 0, 3, 7, 9, 6, 1, 4, 2],
        [8, 9, 1, 6, 0, 4, 3, 5, 2, 7],
        [9, 4, 5, 3, 1, 2, 6, 8, 7, 0],
        [4, 2, 8, 6, 5, 7, 3, 9, 0, 1],
        [2, 7, 9, 3, 8, 0, 6, 4, 1, 5],
        [7, 0, 4, 6, 9, 1, 3, 2, 5, 8],
    ];
    let d = digits(s);
    if d.len() != 12 {
        return false;
    }
    let mut c = 0usize;
    for (i, &x) in d.iter().rev().enumerate() {
        c = D[c][P[i % 8][x as usize] as usize] as usize;
    }
    c == 0
}

fn ipv6_ok(s: &str) -> bool {
    s.matches(':').count() >= 2
        && s.parse::<std::net::Ipv6Addr>().is_ok()
        && s.chars().any(|c| c.is_ascii_hexdigit())
}

fn phone_ok(s: &str) -> bool {
    (8..=15).contains(&digits(s).len())
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod props;
