//! The word-level rules of the normaliser: the vocabulary, plural → singular, British →
//! American spelling, compounds and one-letter typos. Each rule that is not a curated table
//! only ever rewrites a word missing from the vocabulary into a word of it, so two words the
//! vocabulary knows ("cat" and "car", "mouse" and "moose") are never merged.

use std::collections::HashSet;
use std::sync::LazyLock;

/// Known English words (`words.txt`), plus the canonical forms the tables produce.
static KNOWN: LazyLock<HashSet<&'static str>> = LazyLock::new(|| {
    include_str!("words.txt")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .chain(COMPOUNDS.iter().copied())
        .chain(SPELLING.iter().map(|(_, us)| *us))
        .collect()
});

/// Whether the vocabulary has `word` (lower case).
pub fn known(word: &str) -> bool {
    KNOWN.contains(word)
}

/// Compounds written as one word, as two or hyphenated: two adjacent words that join into
/// one of these are written joined ("e mail", "e-mail" → "email"; "log in" → "login"). Only
/// this table joins words separated by a space; a hyphen also joins into any known word.
pub const COMPOUNDS: &[&str] = &[
    "email",
    "login",
    "logout",
    "logon",
    "logoff",
    "signin",
    "signup",
    "signout",
    "setup",
    "backup",
    "database",
    "dataset",
    "website",
    "webpage",
    "homepage",
    "keyboard",
    "laptop",
    "desktop",
    "password",
    "passcode",
    "username",
    "filename",
    "online",
    "offline",
    "weekend",
    "nighttime",
    "daytime",
    "bedtime",
    "checklist",
    "bookshelf",
    "bookmark",
    "notebook",
    "textbook",
    "smartphone",
    "headphone",
    "toothbrush",
    "toothpaste",
    "airport",
    "haircut",
    "timestamp",
    "timezone",
    "screenshot",
    "hardware",
    "software",
    "firewall",
    "framework",
    "workflow",
    "playlist",
    "wallpaper",
    "upload",
    "download",
    "inbox",
    "spreadsheet",
    "healthcare",
    "wildlife",
    "sunscreen",
    "sunglasses",
    "startup",
    "standup",
    "makeup",
    "everyday",
    "anyway",
    "barcode",
    "postcode",
    "zipcode",
    "voicemail",
    "newsletter",
    "lifestyle",
    "grandmother",
    "grandfather",
];

/// British spellings that the vocabulary also lists (so the rules below leave them), and
/// irregular ones, with their American form.
const SPELLING: &[(&str, &str)] = &[
    ("grey", "gray"),
    ("greyish", "grayish"),
    ("programme", "program"),
    ("programmes", "programs"),
    ("cheque", "check"),
    ("cheques", "checks"),
    ("tyre", "tire"),
    ("tyres", "tires"),
    ("theatre", "theater"),
    ("theatres", "theaters"),
    ("licence", "license"),
    ("licences", "licenses"),
    ("judgement", "judgment"),
    ("judgements", "judgments"),
    ("acknowledgement", "acknowledgment"),
    ("practise", "practice"),
    ("practised", "practiced"),
    ("practising", "practicing"),
    ("catalogue", "catalog"),
    ("catalogues", "catalogs"),
    ("analogue", "analog"),
    ("ageing", "aging"),
    ("plough", "plow"),
    ("mould", "mold"),
    ("mouldy", "moldy"),
    ("sceptic", "skeptic"),
    ("sceptical", "skeptical"),
    ("aluminium", "aluminum"),
    ("jewellery", "jewelry"),
    ("pyjamas", "pajamas"),
    ("moustache", "mustache"),
    ("aeroplane", "airplane"),
    ("aeroplanes", "airplanes"),
    ("sulphur", "sulfur"),
    ("maths", "math"),
    ("whilst", "while"),
    ("amongst", "among"),
    ("cosy", "cozy"),
    ("kerb", "curb"),
    ("manoeuvre", "maneuver"),
    ("manoeuvres", "maneuvers"),
    ("enrol", "enroll"),
    ("enrolment", "enrollment"),
    ("fulfil", "fulfill"),
    ("fulfilment", "fulfillment"),
    ("instalment", "installment"),
    ("skilful", "skillful"),
    ("wilful", "willful"),
    ("speciality", "specialty"),
    ("travelled", "traveled"),
    ("travelling", "traveling"),
    ("traveller", "traveler"),
    ("travellers", "travelers"),
    ("cancelled", "canceled"),
    ("cancelling", "canceling"),
    ("labelled", "labeled"),
    ("labelling", "labeling"),
    ("modelled", "modeled"),
    ("modelling", "modeling"),
    ("fuelled", "fueled"),
    ("signalled", "signaled"),
    ("counselling", "counseling"),
    ("levelled", "leveled"),
    ("jeweller", "jeweler"),
    ("marvellous", "marvelous"),
];

/// Plural-looking words whose singular is another word ("glasses" are not a glass, "news"
/// is not new) or no word at all.
const KEEP_S: &[&str] = &[
    "does",
    "goes",
    "this",
    "news",
    "means",
    "species",
    "series",
    "glasses",
    "shorts",
    "pants",
    "trousers",
    "jeans",
    "goods",
    "arms",
    "clothes",
    "customs",
    "manners",
    "savings",
    "earnings",
    "belongings",
    "surroundings",
    "premises",
    "quarters",
    "headquarters",
    "remains",
    "odds",
    "besides",
    "theses",
    "hers",
    "ours",
    "yours",
    "theirs",
    "lens",
    "whereas",
    "kudos",
    "always",
    "perhaps",
    "spirits",
    "ashes",
];

/// Whether `w` looks plural but its singular is another word or none ("glasses", "news").
pub fn plural_only(w: &str) -> bool {
    KEEP_S.contains(&w)
}

/// The singular of a regular plural, checked against the vocabulary; anything else as it is.
pub fn singular(w: &str) -> String {
    let keep = w.len() < 4
        || !w.ends_with('s')
        || KEEP_S.contains(&w)
        || ["ss", "us", "is", "ics"].iter().any(|e| w.ends_with(e));
    if keep {
        return w.to_owned();
    }
    let stem = &w[..w.len() - 1];
    if let Some(base) = w.strip_suffix("ies") {
        // "movies" → "movie", "puppies" → "puppy".
        let y = format!("{base}y");
        return if known(stem) {
            stem.to_owned()
        } else if known(&y) {
            y
        } else {
            w.to_owned()
        };
    }
    if known(stem) {
        return stem.to_owned();
    }
    // "boxes" → "box", "potatoes" → "potato".
    match w.strip_suffix("es") {
        Some(es) if es.len() >= 3 && known(es) => es.to_owned(),
        _ => w.to_owned(),
    }
}

/// The American spelling of a British one: the table, then patterns (-our, -re, -ence,
/// -ise/-isation, -yse, ae/oe) that only rewrite an unknown word into a known one.
pub fn american(w: &str) -> String {
    if let Some((_, us)) = SPELLING.iter().find(|(gb, _)| *gb == w) {
        return (*us).to_owned();
    }
    if known(w) {
        return w.to_owned();
    }
    let candidates = [
        w.replacen("our", "or", 1),
        swap_suffix(w, &[("tre", "ter"), ("tres", "ters"), ("tred", "tered")]),
        swap_suffix(w, &[("bre", "ber"), ("bres", "bers")]),
        swap_suffix(
            w,
            &[("ence", "ense"), ("ences", "enses"), ("enced", "ensed")],
        ),
        ise_to_ize(w),
        w.replacen("yse", "yze", 1).replacen("ysing", "yzing", 1),
        w.replacen("ae", "e", 1),
        w.replacen("oe", "e", 1),
        w.replacen("lled", "led", 1).replacen("lling", "ling", 1),
    ];
    candidates
        .into_iter()
        .find(|c| c != w && known(c))
        .unwrap_or_else(|| w.to_owned())
}

fn swap_suffix(w: &str, pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .find_map(|(gb, us)| w.strip_suffix(gb).map(|stem| format!("{stem}{us}")))
        .unwrap_or_else(|| w.to_owned())
}

/// "organise" → "organize", "organisation" → "organization" (the caller keeps it only when the
/// result is known and the original is not, so "promise" and "advertise" stay).
fn ise_to_ize(w: &str) -> String {
    const ENDINGS: &[&str] = &[
        "isations", "isation", "isers", "iser", "ising", "ised", "ises", "ise",
    ];
    ENDINGS
        .iter()
        .find_map(|e| {
            let stem = w.strip_suffix(e)?;
            (stem.len() >= 3).then(|| format!("{stem}{}", e.replacen("is", "iz", 1)))
        })
        .unwrap_or_else(|| w.to_owned())
}

/// The known word one edit away (a letter dropped, added, changed, or two swapped) from a word
/// the vocabulary does not have, when there is exactly one: a dropped, added or swapped letter
/// is preferred to a changed one. Only words of five letters or more are corrected, so short
/// words, where one letter makes another word, are never touched.
pub fn corrected(w: &str) -> Option<String> {
    if w.chars().count() < 5 || !w.chars().all(|c| c.is_ascii_lowercase()) || known(w) {
        return None;
    }
    let b = w.as_bytes();
    let mut slips = HashSet::new();
    let mut changes = HashSet::new();
    let mut try_word = |bytes: Vec<u8>, slip: bool| {
        if let Ok(s) = String::from_utf8(bytes) {
            if s.len() >= 4 && known(&s) {
                if slip {
                    slips.insert(s);
                } else {
                    changes.insert(s);
                }
            }
        }
    };
    for i in 0..=b.len() {
        if i < b.len() {
            let mut del = b.to_vec();
            del.remove(i);
            try_word(del, true);
        }
        if i + 1 < b.len() {
            let mut swap = b.to_vec();
            swap.swap(i, i + 1);
            try_word(swap, true);
        }
        for c in b'a'..=b'z' {
            let mut ins = b.to_vec();
            ins.insert(i, c);
            try_word(ins, true);
            if i < b.len() && b[i] != c {
                let mut sub = b.to_vec();
                sub[i] = c;
                try_word(sub, false);
            }
        }
    }
    let pick = |set: HashSet<String>| (set.len() == 1).then(|| set.into_iter().next()).flatten();
    if slips.is_empty() {
        pick(changes)
    } else {
        pick(slips)
    }
}

/// Whether two words are one edit apart (a letter dropped, added, changed, or two adjacent
/// letters swapped).
pub fn one_edit(a: &str, b: &str) -> bool {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let (short, long) = if a.len() <= b.len() {
        (&a, &b)
    } else {
        (&b, &a)
    };
    match long.len() - short.len() {
        0 => {
            let diff: Vec<usize> = (0..a.len()).filter(|&i| a[i] != b[i]).collect();
            match diff[..] {
                [_] => true,
                [i, j] => j == i + 1 && a[i] == b[j] && a[j] == b[i],
                _ => false,
            }
        }
        1 => {
            let i = (0..short.len())
                .find(|&i| short[i] != long[i])
                .unwrap_or(short.len());
            short[i..] == long[i + 1..]
        }
        _ => false,
    }
}
