use super::*;

fn redacted(text: &str) -> (String, Vec<&'static str>) {
    Vault::default().redact(text)
}

#[test]
fn positives_become_typed_placeholders() {
    let cases = [
        ("mail me at jane.doe+x@example.co.uk please", "EMAIL"),
        ("call +44 20 7946 0958 today", "PHONE"),
        ("call (555) 123-4567 today", "PHONE"),
        ("call 555-123-4567 today", "PHONE"),
        ("card 4111 1111 1111 1111 exp 12/29", "CARD"),
        ("card 5500-0000-0000-0004", "CARD"),
        ("iban GB82 WEST 1234 5698 7654 32 ok", "IBAN"),
        ("iban DE89370400440532013000", "IBAN"),
        ("aadhaar 2345 6789 0124", "AADHAAR"),
        ("pan ABCPE1234F", "PAN"),
        ("from 192.168.10.254 yesterday", "IP"),
        ("from 2001:db8::8a2e:370:7334 yesterday", "IP"),
        ("key sk-proj-abcdefghijklmnop1234 leaked", "API_KEY"),
        ("aws AKIAIOSFODNN7EXAMPLE", "API_KEY"),
        (
            "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.payload.sig",
            "BEARER",
        ),
    ];
    for (text, kind) in cases {
        let (out, kinds) = redacted(text);
        assert!(kinds.contains(&kind), "{text:?} → {out:?} {kinds:?}");
        assert!(out.contains(&format!("<{kind}_1>")), "{text:?} → {out:?}");
    }
}

#[test]
fn negatives_are_left_alone() {
    for text in [
        "order number 123456789012 shipped",
        "order #98765432 and invoice 2024-0042",
        "ISBN 978-3-16-148410-0 and 9780306406157",
        "meeting on 2024-01-15 at 12:30:45",
        "version 1.2.3 and 10.0 release",
        "card-like 4111 1111 1111 1112 fails Luhn",
        "aadhaar-like 2345 6789 0123 fails Verhoeff",
        "iban-like GB82 WEST 1234 5698 7654 33 fails mod-97",
        "the price is 1,234,567 rupees",
    ] {
        let (out, kinds) = redacted(text);
        assert!(kinds.is_empty(), "{text:?} → {out:?} {kinds:?}");
        assert_eq!(out, text);
    }
}

#[test]
fn placeholders_are_consistent_and_restored() {
    let mut vault = Vault::default();
    let (a, _) = vault.redact("write to a@x.io and b@y.io");
    assert_eq!(a, "write to <EMAIL_1> and <EMAIL_2>");
    let (b, _) = vault.redact("again a@x.io");
    assert_eq!(b, "again <EMAIL_1>");
    // The reply is restored even when a placeholder is split across deltas.
    let mut r = Restorer::default();
    let mut out = String::new();
    for delta in [
        "Sure, I wrote to <EM",
        "AIL_2",
        "> and <",
        "EMAIL_1>. Also <b>bold</b>",
        " <UNKNOWN_7>",
    ] {
        out.push_str(&r.push(&vault, delta));
    }
    out.push_str(&r.finish(&vault));
    assert_eq!(
        out,
        "Sure, I wrote to b@y.io and a@x.io. Also <b>bold</b> <UNKNOWN_7>"
    );
}

#[test]
fn check_digits() {
    assert!(luhn_ok("4111111111111111"));
    assert!(!luhn_ok("4111111111111112"));
    assert!(iban_ok("GB82WEST12345698765432"));
    assert!(!iban_ok("GB82WEST12345698765433"));
    assert!(verhoeff_ok("234567890124"));
    assert!(!verhoeff_ok("234567890123"));
}

#[test]
fn trailing_groups_and_unicode_digits() {
    for (text, kind) in [
        ("card 4111 1111 1111 1111 123", "CARD"),
        ("card 4111 1111 1111 1111 12/29", "CARD"),
        ("IBAN DE89 3704 0044 0532 0130 00 BIC COBADEFFXXX", "IBAN"),
        ("DE89370400440532013000 EUR", "IBAN"),
    ] {
        let (out, kinds) = redacted(text);
        assert!(kinds.contains(&kind), "{text:?} → {out:?}");
    }
    // Fullwidth digits are not digits of a number here, and never panic a check.
    let (out, kinds) = redacted("DE\u{ff13}\u{ff13}ABCDEFGHIJK and \u{ff14}111");
    assert!(kinds.is_empty(), "{out:?}");
}

#[test]
fn known_values_are_replaced_wherever_they_stand() {
    let mut vault = Vault::default();
    vault.redact("card 4111 1111 1111 1111");
    let (out, _) = vault.redact("x4111 1111 1111 1111y");
    assert_eq!(out, "x<CARD_1>y");
}

/// What `redact` gives when every detector runs (the set of patterns only lets it skip those
/// that would find nothing).
fn redacted_by_every_detector(text: &str) -> (String, Vec<&'static str>) {
    let mut vault = Vault::default();
    let mut kinds = Vec::new();
    let mut out = text.to_owned();
    for d in &DETECTORS.list {
        if let Some(replaced) = vault.apply(d, &out, &mut kinds) {
            out = replaced;
        }
    }
    (out, kinds)
}

mod props {
    use proptest::prelude::*;

    const PIECES: &[&str] = &[
        "jane@example.com",
        "4111 1111 1111 1111",
        "+44 20 7946 0958",
        "555-123-4567",
        "192.168.1.1",
        "2001:db8::1",
        "sk-abcdefghijklmnop1234",
        "ABCPE1234F",
        "GB82 WEST 1234 5698 7654 32",
        "2345 6789 0124",
        "Bearer abcdefghijklmnopqrstu",
        "<EMAIL_1>",
        "order 12345",
        "hello",
        " ",
        "-",
        "@",
        ".com",
        "4",
        "é",
        "\n",
    ];

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]
        #[test]
        fn skipping_detectors_changes_nothing(picks in proptest::collection::vec(0..PIECES.len(), 0..12)) {
            let text: String = picks.iter().map(|&i| PIECES[i]).collect();
            prop_assert_eq!(super::redacted(&text), super::redacted_by_every_detector(&text));
        }
    }
}
