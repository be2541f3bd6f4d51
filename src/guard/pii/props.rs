//! Property tests of PII redaction and restoration: whatever a message holds, restoring its
//! redaction gives the message back, and a reply restored delta by delta (split anywhere) is
//! the reply restored whole.
//!
//! Texts that already hold placeholder-shaped words (`<EMAIL_1>`) are left out of the
//! round-trip: a literal that looks like a placeholder the vault made is indistinguishable
//! from it by design.

use proptest::prelude::*;

use super::*;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A card number of `body` digits (first one 2–6) with its Luhn check digit, maybe grouped.
fn card() -> impl Strategy<Value = String> {
    (2u32..=6, prop::collection::vec(0u32..10, 14), any::<bool>()).prop_map(
        |(first, rest, grouped)| {
            let mut d: Vec<u32> = std::iter::once(first).chain(rest).collect();
            let check = (0..10)
                .find(|c| {
                    let mut all = d.clone();
                    all.push(*c);
                    let s: String = all.iter().map(|x| x.to_string()).collect();
                    luhn_ok(&s)
                })
                .unwrap_or(0);
            d.push(check);
            let s: String = d.iter().map(|x| x.to_string()).collect();
            if grouped {
                s.as_bytes()
                    .chunks(4)
                    .map(|c| String::from_utf8_lossy(c).into_owned())
                    .collect::<Vec<_>>()
                    .join(" ")
            } else {
                s
            }
        },
    )
}

fn pii_value() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z]{1,8}(\\.[a-z]{1,4})?@[a-z]{1,8}\\.(com|io|co\\.uk)",
        "\\+44 20 [0-9]{4} [0-9]{4}",
        "\\([0-9]{3}\\) [0-9]{3}-[0-9]{4}",
        "[0-9]{3}-[0-9]{3}-[0-9]{4}",
        card(),
        any::<[u8; 4]>().prop_map(|b| std::net::Ipv4Addr::from(b).to_string()),
        any::<[u16; 8]>().prop_map(|s| std::net::Ipv6Addr::from(s).to_string()),
        "sk-[A-Za-z0-9_-]{16,24}",
        "AKIA[0-9A-Z]{16}",
        "Bearer [A-Za-z0-9._-]{16,30}",
        "[A-Z]{3}P[A-Z][0-9]{4}[A-Z]",
        prop::sample::select(
            &[
                "GB82 WEST 1234 5698 7654 32",
                "DE89370400440532013000",
                "2345 6789 0124"
            ][..]
        )
        .prop_map(str::to_owned),
    ]
}

fn filler() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Za-z]{1,8}",
        "[0-9]{1,6}",
        prop::sample::select(
            &[" ", ", ", ". ", "\n", "<", ">", "<b>", "_", "-", ":", "@", "é", "🦀", "(", ")"][..]
        )
        .prop_map(str::to_owned),
        any::<String>(),
    ]
}

/// Messages of PII values and filler, joined with or without separators.
fn message() -> impl Strategy<Value = String> {
    let piece = prop_oneof![2 => pii_value(), 3 => filler()];
    let sep = prop::sample::select(&["", " ", " ", ", ", "\n"][..]);
    prop::collection::vec((piece, sep), 0..12)
        .prop_map(|p| {
            p.into_iter()
                .map(|(x, s)| format!("{x}{s}"))
                .collect::<String>()
        })
        .prop_filter("holds a placeholder-shaped word", |t| {
            !PLACEHOLDER.is_match(t)
        })
}

/// Cuts `text` at the char boundaries nearest to `cuts`.
fn split(text: &str, cuts: &[usize]) -> Vec<String> {
    let bounds: Vec<usize> = (0..=text.len())
        .filter(|&i| text.is_char_boundary(i))
        .collect();
    let mut at: Vec<usize> = cuts.iter().map(|c| bounds[c % bounds.len()]).collect();
    at.push(0);
    at.push(text.len());
    at.sort_unstable();
    at.dedup();
    at.windows(2).map(|w| text[w[0]..w[1]].to_owned()).collect()
}

fn restore_streamed(vault: &Vault, deltas: &[String]) -> String {
    let mut r = Restorer::default();
    let mut out: String = deltas.iter().map(|d| r.push(vault, d)).collect();
    out.push_str(&r.finish(vault));
    out
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn redaction_never_panics(text in any::<String>()) {
        let (out, kinds) = Vault::default().redact(&text);
        prop_assert_eq!(kinds.is_empty(), out == text);
    }

    #[test]
    fn restoring_a_redaction_gives_the_message_back(a in message(), b in message()) {
        // One vault across two messages, as in a conversation.
        let mut vault = Vault::default();
        for text in [&a, &b] {
            let (redacted, _) = vault.redact(text);
            prop_assert_eq!(&restore(&vault, &redacted), text, "redacted: {:?}", redacted);
        }
    }

    #[test]
    fn a_reply_restored_delta_by_delta_is_the_reply_restored_whole(
        said in message(),
        noise in prop::collection::vec(filler(), 0..6),
        cuts in prop::collection::vec(any::<usize>(), 0..20),
    ) {
        let mut vault = Vault::default();
        let (redacted, _) = vault.redact(&said);
        // A reply that echoes the placeholders among other text, some of it `<`-shaped.
        let reply = format!("{}<UNKNOWN_3> {redacted}<EMAIL_{}", noise.concat(), noise.len());
        let whole = restore(&vault, &reply);
        prop_assert_eq!(restore_streamed(&vault, &split(&reply, &cuts)), whole);
    }
}
