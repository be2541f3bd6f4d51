//! The deterministic reply generator shared by `parley mock-upstream` and the in-process `mock`
//! provider: the same seed and request always give the same reply, so tests can assert on it.
//!
//! A request can ask for a fault or a pace with a directive anywhere in its last user message,
//! `[[mock:KEY=VALUE,…]]`:
//!
//! | directive | effect |
//! |---|---|
//! | `status=N` | answer HTTP status N (429 comes with `Retry-After: 1`) |
//! | `hang` | accept the request, then send nothing |
//! | `drop_after=N` | stream N chunks, then drop the connection |
//! | `ttft_ms=N` | wait N ms before the first byte |
//! | `tps=N` | stream N chunks per second |
//! | `words=N` | reply with exactly N words |
//! | `echo` | the reply starts with the last user message |

use std::time::Duration;

use crate::tokens::{self, Encoding};

const WORDS: &[&str] = &[
    "amber", "bright", "canyon", "delta", "ember", "falcon", "garden", "harbor", "island",
    "jasmine", "kettle", "lantern", "meadow", "nectar", "orbit", "pebble", "quartz", "river",
    "saffron", "timber", "umbra", "velvet", "willow", "xenon", "yonder", "zephyr", "atlas",
    "breeze", "cobalt", "dune", "echo", "fjord", "glacier", "horizon", "ivory", "juniper", "kelp",
    "lumen", "mosaic", "nova", "opal", "prism", "quill", "ripple", "summit", "tundra", "ultra",
    "vista", "wander", "yarrow", "zenith", "acorn", "basil", "cedar", "dawn", "fern",
];

/// One message of a request, as the generator sees it.
#[derive(Debug, Clone)]
pub struct MockMessage {
    pub role: String,
    pub content: String,
}

/// A fault the request asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Status(u16),
    Hang,
    DropAfter(usize),
}

/// What the mock will answer to one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The reply, one streamed chunk per element; their concatenation is the reply text.
    pub chunks: Vec<String>,
    pub finish_reason: &'static str,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub fault: Option<Fault>,
    pub ttft: Option<Duration>,
    pub tokens_per_sec: Option<f64>,
}

impl Plan {
    pub fn text(&self) -> String {
        self.chunks.concat()
    }
}

/// Plans the reply to `messages` under `seed`. `max_tokens` cuts the reply (`length`).
pub fn plan(seed: u64, messages: &[MockMessage], max_tokens: Option<u32>) -> Plan {
    let last_user = messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .map_or("", |m| m.content.as_str());
    // A request that ends with an assistant prefix continues a reply: the faults asked for by
    // the user message were meant for the first attempt, not for the continuation.
    let continuing = messages.last().is_some_and(|m| m.role == "assistant");
    let directives = if continuing {
        Directives::default()
    } else {
        Directives::parse(last_user)
    };
    let mut rng = SplitMix64(fnv1a(seed, messages));
    let n_words = directives
        .words
        .unwrap_or_else(|| 8 + (rng.next() % 24) as usize);

    let mut chunks = Vec::with_capacity(n_words + 1);
    if directives.echo {
        chunks.push(format!("{last_user} |"));
    }
    for i in 0..n_words {
        let word = WORDS[(rng.next() % WORDS.len() as u64) as usize];
        let sep = if i == 0 && chunks.is_empty() { "" } else { " " };
        chunks.push(format!("{sep}{word}"));
    }
    if let Some(last) = chunks.last_mut() {
        last.push('.');
    }

    let mut finish_reason = "stop";
    if let Some(max) = max_tokens {
        let mut kept = 0;
        let mut text = String::new();
        for chunk in &chunks {
            text.push_str(chunk);
            if tokens::count(Encoding::Cl100kBase, &text) > max {
                finish_reason = "length";
                break;
            }
            kept += 1;
        }
        chunks.truncate(kept);
    }
    let prompt_tokens = messages
        .iter()
        .map(|m| tokens::count(Encoding::Cl100kBase, &m.content) + tokens::MESSAGE_FRAMING_TOKENS)
        .sum();
    let completion_tokens = tokens::count(Encoding::Cl100kBase, &chunks.concat());
    Plan {
        chunks,
        finish_reason,
        prompt_tokens,
        completion_tokens,
        fault: directives.fault,
        ttft: directives.ttft,
        tokens_per_sec: directives.tps,
    }
}

#[derive(Debug, Default)]
struct Directives {
    fault: Option<Fault>,
    ttft: Option<Duration>,
    tps: Option<f64>,
    words: Option<usize>,
    echo: bool,
}

impl Directives {
    fn parse(text: &str) -> Self {
        let mut d = Self::default();
        let mut rest = text;
        while let Some(start) = rest.find("[[mock:") {
            let body = &rest[start + 7..];
            let Some(end) = body.find("]]") else { break };
            for item in body[..end].split(',') {
                let (key, value) = item.split_once('=').unwrap_or((item, ""));
                match (key.trim(), value.trim()) {
                    ("status", v) => d.fault = v.parse().ok().map(Fault::Status),
                    ("hang", _) => d.fault = Some(Fault::Hang),
                    ("drop_after", v) => d.fault = v.parse().ok().map(Fault::DropAfter),
                    ("ttft_ms", v) => d.ttft = v.parse().ok().map(Duration::from_millis),
                    ("tps", v) => d.tps = v.parse().ok().filter(|t: &f64| *t > 0.0),
                    ("words", v) => d.words = v.parse().ok().map(|n: usize| n.min(100_000)),
                    ("echo", _) => d.echo = true,
                    _ => {}
                }
            }
            rest = &body[end + 2..];
        }
        d
    }
}

/// FNV-1a over the seed and the messages: stable across platforms and Rust versions.
fn fnv1a(seed: u64, messages: &[MockMessage]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(&seed.to_le_bytes());
    for m in messages {
        eat(m.role.as_bytes());
        eat(&[0]);
        eat(m.content.as_bytes());
        eat(&[1]);
    }
    h
}

struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(text: &str) -> Vec<MockMessage> {
        vec![MockMessage {
            role: "user".into(),
            content: text.into(),
        }]
    }

    #[test]
    fn deterministic_per_seed_and_request() {
        let a = plan(1, &user("hello"), None);
        assert_eq!(a, plan(1, &user("hello"), None));
        assert_ne!(a.text(), plan(2, &user("hello"), None).text());
        assert_ne!(a.text(), plan(1, &user("hello!"), None).text());
        assert!(a.chunks.len() >= 8);
        assert_eq!(a.finish_reason, "stop");
    }

    #[test]
    fn directives() {
        let p = plan(0, &user("x [[mock:words=3,drop_after=2,ttft_ms=5]]"), None);
        assert_eq!(p.chunks.len(), 3);
        assert_eq!(p.fault, Some(Fault::DropAfter(2)));
        assert_eq!(p.ttft, Some(Duration::from_millis(5)));
        assert_eq!(
            plan(0, &user("[[mock:status=503]]"), None).fault,
            Some(Fault::Status(503))
        );
        assert_eq!(
            plan(0, &user("[[mock:hang]]"), None).fault,
            Some(Fault::Hang)
        );
        assert!(plan(0, &user("hi [[mock:echo]]"), None)
            .text()
            .starts_with("hi [[mock:echo]] |"));
        // Unterminated or unknown directives are ignored.
        assert_eq!(plan(0, &user("[[mock:status=500"), None).fault, None);
    }

    #[test]
    fn max_tokens_cuts_with_length() {
        let p = plan(0, &user("[[mock:words=50]]"), Some(5));
        assert_eq!(p.finish_reason, "length");
        assert!(p.completion_tokens <= 5 && !p.chunks.is_empty());
    }
}
