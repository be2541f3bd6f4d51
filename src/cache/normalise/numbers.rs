//! Number words to digits: "three" → 3, "twenty-one" → 21, "two hundred and five" → 205,
//! "a thousand" → "a 1000", "third" → "3rd". Parsing is a small recursive descent over the
//! lower-case words of a run the caller has already found to be joined by spaces or hyphens.

const UNITS: &[&str] = &[
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
];

const TENS: &[&str] = &[
    "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety",
];

/// Ordinals that are only ordinals ("first" and "second" also mean other things).
const ORDINALS: &[(&str, &str)] = &[
    ("third", "3rd"),
    ("fourth", "4th"),
    ("fifth", "5th"),
    ("sixth", "6th"),
    ("seventh", "7th"),
    ("eighth", "8th"),
    ("ninth", "9th"),
    ("tenth", "10th"),
    ("eleventh", "11th"),
    ("twelfth", "12th"),
    ("twentieth", "20th"),
    ("hundredth", "100th"),
];

/// Words after which "one" is a pronoun ("which one", "the one", "no one").
const ONE_AS_PRONOUN_AFTER: &[&str] = &[
    "the", "this", "that", "which", "each", "every", "any", "no", "some", "another", "other",
    "last", "next", "only", "little", "right", "wrong", "new", "old", "big", "small", "good",
    "best", "same", "first", "someone", "a", "an",
];

/// Whether a word can be part of a number.
fn is_number_word(w: &str) -> bool {
    UNITS.contains(&w) || TENS.contains(&w) || matches!(w, "hundred" | "thousand" | "million")
}

fn unit(w: &str) -> Option<u64> {
    UNITS.iter().position(|u| *u == w).map(|i| i as u64)
}

fn ten(w: &str) -> Option<u64> {
    TENS.iter()
        .position(|t| *t == w)
        .map(|i| 20 + 10 * i as u64)
}

/// 0–99 at `words[0..]`: a unit, or a ten with an optional unit after it.
fn small(words: &[&str]) -> Option<(u64, usize)> {
    let first = *words.first()?;
    if let Some(u) = unit(first) {
        return Some((u, 1));
    }
    let t = ten(first)?;
    match words.get(1).and_then(|w| unit(w)) {
        Some(u) if (1..10).contains(&u) => Some((t + u, 2)),
        _ => Some((t, 1)),
    }
}

/// A small number after "and" or directly: the tail of "two hundred (and) five".
fn tail(words: &[&str], max: u64) -> Option<(u64, usize)> {
    let (skip, rest) = match words.first() {
        Some(&"and") => (1, &words[1..]),
        _ => (0, words),
    };
    small(rest)
        .filter(|(v, _)| *v > 0 && *v < max)
        .map(|(v, n)| (v, n + skip))
}

/// 0–999: "hundred" with an optional count before it and an optional tail after it.
fn hundreds(words: &[&str]) -> Option<(u64, usize)> {
    let (count, used) = match small(words) {
        Some((v, n)) if (1..10).contains(&v) && words.get(n) == Some(&"hundred") => (v, n),
        Some(found) => return Some(found),
        None if words.first() == Some(&"hundred") => (1, 0),
        None => return None,
    };
    let after = used + 1;
    let (rest, more) = tail(&words[after..], 100).unwrap_or((0, 0));
    Some((count * 100 + rest, after + more))
}

/// A whole number at `words[0..]`, up to the millions; answers its value and the words it
/// took.
fn number(words: &[&str]) -> Option<(u64, usize)> {
    let mut total = 0;
    let mut at = 0;
    let mut scale_seen = u64::MAX;
    loop {
        let (v, n) = match hundreds(&words[at..]) {
            Some(found) => found,
            None if at > 0 => break,
            None => match words.first() {
                Some(&"thousand") => (1, 0),
                Some(&"million") => (1, 0),
                _ => return None,
            },
        };
        let scale = match words.get(at + n) {
            Some(&"thousand") => 1_000,
            Some(&"million") => 1_000_000,
            _ => 1,
        };
        if scale >= scale_seen {
            break;
        }
        total += v * scale;
        at += n + usize::from(scale > 1);
        scale_seen = scale;
        if scale == 1 {
            break;
        }
        // "two thousand and five": an "and" before the last part.
        if words.get(at) == Some(&"and") && words.get(at + 1).is_some_and(|w| is_number_word(w)) {
            at += 1;
        }
    }
    (at > 0).then_some((total, at))
}

/// The digits for the number words at the start of `words` (lower case, joined by spaces or
/// hyphens) and how many words they took; `before` is the word before them, `None` at the
/// start. "one" as a pronoun ("which one", "one of") stays a word.
pub fn parse(words: &[&str], before: Option<&str>) -> Option<(String, usize)> {
    if let Some((_, digits)) = ORDINALS.iter().find(|(w, _)| Some(w) == words.first()) {
        return Some(((*digits).to_owned(), 1));
    }
    let (value, used) = number(words)?;
    let lone_one = used == 1 && words[0] == "one";
    if lone_one
        && (before.is_some_and(|b| ONE_AS_PRONOUN_AFTER.contains(&b))
            || words
                .get(1)
                .is_some_and(|w| matches!(*w, "of" | "another" | "by" | "or" | "and")))
    {
        return None;
    }
    Some((value.to_string(), used))
}
