//! Property tests of the false-hit guards: any pair of texts is checked without a panic, a
//! question always passes against itself, and every guard is symmetric (which question was
//! cached and which was asked never changes the verdict, nor the guard that gives it).

use proptest::prelude::*;

use super::*;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Words that each guard looks at, and some it ignores.
const WORDS: &[&str] = &[
    "what",
    "which",
    "who",
    "when",
    "where",
    "why",
    "how",
    "is",
    "was",
    "will",
    "my",
    "your",
    "their",
    "not",
    "never",
    "isn't",
    "don't",
    "cannot",
    "from",
    "to",
    "into",
    "than",
    "before",
    "the",
    "a",
    "capital",
    "of",
    "France",
    "Germany",
    "Paris",
    "parse_config",
    "loadConfig",
    "os.path",
    "call()",
    "2",
    "3",
    "10",
    "2.5",
    "1,000",
    "+",
    "-",
    "*",
    "/",
    "x",
    "2024-01-15",
    "15 March",
    "May 3",
    "\"quoted\"",
    "'single'",
    "“curly”",
    "USD",
    "EUR",
    "leap",
    "year",
    "sort",
    "reverse",
    "explain",
    "exactly",
    "What's",
    "can't",
    "é",
    "Ünïcödé",
    "🦀",
    "?",
    ".",
    "!",
    ",",
    "(",
    ")",
];

fn question() -> impl Strategy<Value = String> {
    let word = prop_oneof![
        6 => prop::sample::select(WORDS).prop_map(str::to_owned),
        1 => "[A-Za-z0-9]{1,10}",
        1 => any::<String>(),
    ];
    let sep = prop::sample::select(&[" ", " ", "", "\n", "  ", "? "][..]);
    prop::collection::vec((word, sep), 0..14)
        .prop_map(|w| w.into_iter().map(|(x, s)| format!("{x}{s}")).collect())
}

/// A question and a near variant of it (one word dropped, swapped or moved), the pairs the
/// guards exist for.
fn near_pair() -> impl Strategy<Value = (String, String)> {
    (
        prop::collection::vec(prop::sample::select(WORDS), 1..12),
        any::<prop::sample::Index>(),
        any::<prop::sample::Index>(),
        prop::sample::select(WORDS),
        0u8..3,
    )
        .prop_map(|(words, i, j, other, edit)| {
            let mut b = words.clone();
            let (i, j) = (i.index(b.len()), j.index(b.len()));
            match edit {
                0 => {
                    b.remove(i);
                }
                1 => b[i] = other,
                _ => b.swap(i, j),
            }
            (words.join(" "), b.join(" "))
        })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn a_question_passes_against_itself(q in question()) {
        prop_assert_eq!(check(&q, &q), Ok(()));
    }

    #[test]
    fn arbitrary_text_passes_against_itself(q in any::<String>()) {
        prop_assert_eq!(check(&q, &q), Ok(()));
    }

    #[test]
    fn guards_are_symmetric(a in question(), b in question()) {
        prop_assert_eq!(check(&a, &b), check(&b, &a));
    }

    #[test]
    fn guards_are_symmetric_on_near_pairs((a, b) in near_pair()) {
        prop_assert_eq!(check(&a, &b), check(&b, &a));
    }

    #[test]
    fn arbitrary_pairs_never_panic(a in any::<String>(), b in any::<String>()) {
        prop_assert_eq!(check(&a, &b), check(&b, &a));
    }
}
