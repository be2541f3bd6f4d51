//! Tests that hold the compact counter to tiktoken-rs: the vocabularies rank for rank, and
//! `encode_ordinary(text).len()` on a varied corpus and on a few thousand seeded random texts.
//! `measure` (ignored; run it alone with `--ignored --nocapture`) prints memory and speed.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tiktoken_rs::CoreBPE;

use super::tokenizer::{count, Encoding};
use super::vocab::{self, Vocab};

const ENCODINGS: [Encoding; 2] = [Encoding::Cl100kBase, Encoding::O200kBase];

fn reference(encoding: Encoding) -> &'static CoreBPE {
    match encoding {
        Encoding::Cl100kBase => tiktoken_rs::cl100k_base_singleton(),
        Encoding::O200kBase => tiktoken_rs::o200k_base_singleton(),
    }
}

fn assert_same_count(encoding: Encoding, text: &str) {
    let expected = reference(encoding).encode_ordinary(text).len();
    assert_eq!(
        count(encoding, text) as usize,
        expected,
        "{encoding:?} on {text:?}"
    );
}

const PROSE: &str = "The quick brown fox jumps over the lazy dog. It's 5 o'clock; \
    they'll say \"we've\" and \"I'M DONE\" — don't they? Mr. O'Neil paid $1,234.56 on 2024-02-29.\n\n\
    A second paragraph follows, with a list:\n- one\n- two\n\t- nested\r\n";

const CODE: &str = "fn main() {\n    let xs: Vec<u32> = (0..10).map(|x| x * x).collect();\n    \
    println!(\"{:?}\", xs);\n}\n\ndef f(a, b=2, *args, **kw):\n\treturn a + b  # comment\n\n\
    #include <stdio.h>\nint main(void){printf(\"%d\\n\", 42);return 0;}\n\
    // ==========================================================================\n\
    SELECT id, name FROM users WHERE age >= 18 ORDER BY name DESC;\n";

const JSON: &str = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],
  "temperature":0.7, "n": null, "nested": {"a": [1, 2.5e-3, true, false], "emoji": "\ud83d\ude00"}}"#;

const UNICODE: [&str; 10] = [
    "日本語のテキストです。東京は晴れ。中文文本测试，汉字很多。한국어 문장도 있습니다.",
    "emoji 😀😃🎉👍🏽👨‍👩‍👧‍👦🏳️‍🌈🇫🇷🇯🇵 ✨❤️",
    "Ça va? Élève, naïve, coöperate, Straße, Øresund, smörgåsbord, Việt Nam, tiếng Việt",
    "decomposed: e\u{301}cole, n\u{303}, a\u{308}\u{304}",
    "العربية لغة جميلة. مرحبا بالعالم! 123 عربي",
    "עברית: שלום עולם, mixed with English and ١٢٣",
    "Ελληνικά, Русский текст, Українська, ქართული, हिन्दी, தமிழ், ไทย",
    "\u{0}\u{1}\u{7f}\u{80}\u{ad}\u{200b}\u{200d}\u{feff}\u{fffd}\u{10ffff}",
    "ℌ𝔢𝔩𝔩𝔬 𝕎𝕠𝕣𝕝𝕕 ①②③ ½ ² Ⅻ",
    "<|endoftext|> <|fim_prefix|> <|endofprompt|> <|im_start|>",
];

const SPACING: [&str; 9] = [
    "",
    " ",
    "    ",
    "\n",
    "\n\n\n\n",
    "  \n  \t \r\n\r\n   x   ",
    "word   \n   word\t\t\tword      ",
    "trailing spaces      ",
    "\u{a0}\u{2003}\u{3000} wide\u{3000}spaces",
];

const NUMBERS: [&str; 6] = [
    "0",
    "1234567890123456789",
    "3.14159265358979 -42e10 +7 0x1F 0b1010 1_000_000",
    "1,000,000.00 99% 12:34:56 v1.2.3",
    "٣٤٥ ๑๒๓ 一二三",
    "a1b2c3d4e5 4th 21st 1990s",
];

/// Texts whose pieces are long enough for the heap merge.
fn long_texts() -> Vec<String> {
    vec![
        "a".repeat(5000),
        "ab".repeat(1500),
        "pneumonoultramicroscopicsilicovolcanoconiosis".repeat(20),
        "x".repeat(127) + " " + &"y".repeat(128) + " " + &"z".repeat(129),
        "=".repeat(300) + &"-".repeat(300),
        " ".repeat(1000) + "end",
        "日本".repeat(400),
        "😀".repeat(300),
        "QmFzZTY0IGRhdGEgbG9va3MgbGlrZSB0aGlz".repeat(30),
        "deadbeefcafebabe0123456789abcdef".repeat(40),
        PROSE.repeat(50),
    ]
}

fn corpus() -> Vec<String> {
    let mut texts: Vec<String> = [PROSE, CODE, JSON].iter().map(|s| s.to_string()).collect();
    for group in [&UNICODE[..], &SPACING[..], &NUMBERS[..]] {
        texts.extend(group.iter().map(|s| s.to_string()));
    }
    texts.extend(long_texts());
    texts
}

/// A random text: characters from a few pools, mostly short with the odd long one.
fn random_text(rng: &mut StdRng) -> String {
    const POOLS: [&str; 7] = [
        "abcdefghijklmnopqrstuvwxyz",
        "ABCDEFGHIJKLMNOPQRSTUVWXYZ'",
        "0123456789",
        " \t\n\r  ",
        "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
        "éèçàüöñßøåæœ日本語中文한국어😀🎉👍\u{200d}\u{301}عربيעברית",
        "\u{0}\u{1}\u{7f}\u{80}\u{a0}\u{2028}\u{fffd}",
    ];
    let len = if rng.gen_ratio(1, 50) {
        rng.gen_range(100..600)
    } else {
        rng.gen_range(0..40)
    };
    // A few texts draw from one pool only, so that long single pieces occur.
    let only: Option<usize> = rng.gen_ratio(1, 5).then(|| rng.gen_range(0..POOLS.len()));
    (0..len)
        .map(|_| {
            if rng.gen_ratio(1, 30) {
                // Any scalar value: the nearest to random bytes that a `&str` can be.
                return char::from_u32(rng.gen_range(0..0x11_0000)).unwrap_or('\u{fffd}');
            }
            let pool: Vec<char> = POOLS[only.unwrap_or_else(|| rng.gen_range(0..POOLS.len()))]
                .chars()
                .collect();
            pool[rng.gen_range(0..pool.len())]
        })
        .collect()
}

#[test]
fn vocabularies_match_tiktoken_rank_for_rank() {
    for (encoding, blob) in [
        (Encoding::Cl100kBase, vocab::CL100K_BASE),
        (Encoding::O200kBase, vocab::O200K_BASE),
    ] {
        let ours = Vocab::new(blob);
        let theirs = reference(encoding);
        for rank in 0..ours.len() as u32 {
            let bytes = theirs.decode_bytes(&[rank]).unwrap(); // ok: test
            assert_eq!(ours.rank(&bytes), Some(rank), "{encoding:?} rank {rank}");
        }
        // The next rank is not an ordinary token in tiktoken either.
        let next = ours.len() as u32;
        assert!(theirs.encode_ordinary("x").len() == 1 && theirs.decode_bytes(&[next]).is_err());
    }
}

#[test]
fn corpus_counts_match_tiktoken() {
    for encoding in ENCODINGS {
        for text in corpus() {
            assert_same_count(encoding, &text);
        }
        // Everything at once, so that pieces meet across the seams.
        assert_same_count(encoding, &corpus().concat());
    }
}

#[test]
fn random_counts_match_tiktoken() {
    let mut rng = StdRng::seed_from_u64(0x7061_726c_6579);
    for _ in 0..3000 {
        let text = random_text(&mut rng);
        for encoding in ENCODINGS {
            assert_same_count(encoding, &text);
        }
    }
}

/// Resident set size of this process, from `/proc/self/status`.
fn rss_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|kb| {
            kb.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<usize>()
                .ok()
        })
        .map_or(0, |kb| kb * 1024)
}

/// Nanoseconds per KiB that `f` takes over `text`.
fn ns_per_kib(text: &str, mut f: impl FnMut(&str) -> usize) -> f64 {
    let rounds = (2 << 20) / text.len().max(1) + 1;
    let mut sink = f(text);
    let start = std::time::Instant::now();
    for _ in 0..rounds {
        sink = sink.wrapping_add(f(std::hint::black_box(text)));
    }
    std::hint::black_box(sink);
    start.elapsed().as_nanos() as f64 / (rounds * text.len()) as f64 * 1024.0
}

#[test]
#[ignore = "prints memory and speed; run alone: --ignored --nocapture measure"]
fn measure() {
    const MIB: f64 = 1024.0 * 1024.0;
    for encoding in ENCODINGS {
        let before = rss_bytes();
        let start = std::time::Instant::now();
        let counter = encoding.counter().unwrap(); // ok: test
        let built = start.elapsed();
        counter.count(PROSE);
        let ours = rss_bytes() - before;
        let before = rss_bytes();
        reference(encoding).encode_ordinary(PROSE);
        let theirs = rss_bytes() - before;
        eprintln!(
            "{encoding:?}: {} tokens, {:.2} MiB of vocabulary, built in {built:?}; RSS +{:.2} MiB \
             (tiktoken-rs CoreBPE: +{:.2} MiB)",
            counter.vocab_len(),
            counter.memory_bytes() as f64 / MIB,
            ours as f64 / MIB,
            theirs as f64 / MIB,
        );
    }
    // `benches/tokens.rs`'s paragraphs, so that the figures compare with its criterion rows.
    let paragraphs: String = (0..10)
        .map(|i| {
            format!(
                "Message {i}: the quick brown fox jumps over the lazy dog while parley keeps the \
                 conversation in storage and sends only what fits the budget upstream. "
            )
            .repeat(4)
        })
        .collect();
    let samples = [
        ("bench paragraphs", paragraphs),
        ("english", PROSE.repeat(40)),
        ("code", CODE.repeat(40)),
        ("cjk+emoji", UNICODE[..2].concat().repeat(40)),
    ];
    for encoding in ENCODINGS {
        let counter = encoding.counter().unwrap(); // ok: test
        let theirs = reference(encoding);
        for (name, text) in &samples {
            // Alternate the two and keep each one's best round, against a busy machine.
            let (mut ours, mut tiktoken) = (f64::MAX, f64::MAX);
            for _ in 0..3 {
                ours = ours.min(ns_per_kib(text, |t| counter.count(t)));
                tiktoken = tiktoken.min(ns_per_kib(text, |t| theirs.encode_ordinary(t).len()));
            }
            eprintln!(
                "{encoding:?} {name}: {ours:.0} ns/KiB, tiktoken-rs {tiktoken:.0} ns/KiB ({:.2}×)",
                ours / tiktoken
            );
        }
    }
}
