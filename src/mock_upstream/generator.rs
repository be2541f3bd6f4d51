//! The deterministic reply generator shared by `parley mock-upstream` and the in-process `mock`
//! provider: the same seed and request always give the same reply, so tests can assert on it.
//!
//! A request can ask for a fault, a pace or a tool call with a directive anywhere in its last
//! user message, `[[mock:KEY=VALUE,…]]` (several keys are comma separated):
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
//! | `tool` | call the first offered tool (the one `tool_choice` names, when it names one) |
//! | `tool=NAME` | call the tool NAME if it is offered (no call otherwise) |
//! | `tools=N` | call the first N offered tools, in parallel |
//!
//! What a reply is, first rule that applies first ([`plan_request`]):
//! 1. **Tool calls**, when tools are offered, the choice is not `None`, the request does not end
//!    with tool results (nor with an assistant prefix), and a `tool` directive above picks a tool
//!    or the choice is `Required` (the first tool) or `Named` (that tool, if offered). No text;
//!    finish reason `tool_calls`; ids `call_<i>_<8 hex of a hash of seed and request>`.
//!    Arguments come from the tool's JSON schema: every property of `properties`, a `string`
//!    gets the last user message without its directives (trimmed), `integer`/`number` 1,
//!    `boolean` true, `array` [], `object` {}, an `enum` its first value; a schema without
//!    properties gives `{"input": <that text>}`.
//! 2. **Tool results** ending the request: `Tool results: <c1>; <c2>.`, an error result shown as
//!    `error: <c>`.
//! 3. **`json_schema`**: the JSON value the same schema rules build, compact, in chunks of at most
//!    12 characters. **`json_object`**: `{"reply":"<the usual words reply>"}`, chunked alike.
//! 4. **Words**, seeded by the messages alone; with images in the last user message the reply
//!    begins with a chunk `I see 1 image.` / `I see N images.` and the words follow with a
//!    leading space.
//!
//! `max_tokens` cuts any text reply (finish reason `length`), never tool calls. Prompt tokens
//! count every message's content (cl100k) plus framing: tool results travel as `tool` messages
//! and an assistant's earlier calls in its content (see [`assistant_content`]), so both count.
//! Completion tokens of tool calls are those of their names and arguments.

use std::time::Duration;

use serde_json::Value;

use super::tools;
use crate::tokens::{self, Encoding};

const WORDS: &[&str] = &[
    "amber", "bright", "canyon", "delta", "ember", "falcon", "garden", "harbor", "island",
    "jasmine", "kettle", "lantern", "meadow", "nectar", "orbit", "pebble", "quartz", "river",
    "saffron", "timber", "umbra", "velvet", "willow", "xenon", "yonder", "zephyr", "atlas",
    "breeze", "cobalt", "dune", "echo", "fjord", "glacier", "horizon", "ivory", "juniper", "kelp",
    "lumen", "mosaic", "nova", "opal", "prism", "quill", "ripple", "summit", "tundra", "ultra",
    "vista", "wander", "yarrow", "zenith", "acorn", "basil", "cedar", "dawn", "fern",
];

/// JSON replies stream in pieces of at most this many characters.
const JSON_CHUNK_CHARS: usize = 12;

/// One message of a request, as the generator sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MockMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The text (for `tool`, the result; see [`assistant_content`] for an assistant's calls).
    pub content: String,
}

/// A function tool the request offers.
#[derive(Debug, Clone, PartialEq)]
pub struct MockTool {
    pub name: String,
    /// JSON schema of the arguments (may be `Null`).
    pub parameters: Value,
}

/// How the request lets the model use its tools.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum MockChoice {
    #[default]
    Auto,
    None,
    Required,
    Named(String),
}

/// A whole request, as the generator sees it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MockRequest {
    pub messages: Vec<MockMessage>,
    /// Image parts in the last user message.
    pub images: usize,
    /// What every image of the request costs, as OpenAI prices images (counted in the prompt).
    pub image_tokens: u32,
    /// When the request ends with tool results: `(content, is_error)`, in order. The results are
    /// also among `messages` (role `tool`), which is where their tokens are counted.
    pub tool_results: Vec<(String, bool)>,
    pub tools: Vec<MockTool>,
    pub choice: MockChoice,
    /// The schema of a `json_schema` response format.
    pub json_schema: Option<Value>,
    /// A `json_object` response format.
    pub json_object: bool,
    pub max_tokens: Option<u32>,
}

/// A tool call of a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MockCall {
    pub id: String,
    pub name: String,
    /// Compact JSON text.
    pub arguments: String,
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
    /// The calls of a `tool_calls` reply (then `chunks` is empty).
    pub tool_calls: Vec<MockCall>,
}

impl Plan {
    pub fn text(&self) -> String {
        self.chunks.concat()
    }
}

/// The content of an assistant message that made `calls`: its text, then one line
/// `name(arguments)` per call, so that the calls count as prompt tokens of later requests.
pub fn assistant_content(text: &str, calls: &[MockCall]) -> String {
    let mut out = text.to_owned();
    for call in calls {
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(&format!("{}({})", call.name, call.arguments));
    }
    out
}

/// Plans the reply to `messages` under `seed`. `max_tokens` cuts the reply (`length`).
pub fn plan(seed: u64, messages: &[MockMessage], max_tokens: Option<u32>) -> Plan {
    plan_request(
        seed,
        &MockRequest {
            messages: messages.to_vec(),
            max_tokens,
            ..MockRequest::default()
        },
    )
}

/// Plans the reply to a whole request under `seed` (the rules are in the module docs).
pub fn plan_request(seed: u64, req: &MockRequest) -> Plan {
    let messages = &req.messages;
    let last_user = last_user(messages);
    // A request that ends with an assistant prefix continues a reply: the faults asked for by
    // the user message were meant for the first attempt, not for the continuation.
    let continuing = messages.last().is_some_and(|m| m.role == "assistant");
    let directives = if continuing {
        Directives::default()
    } else {
        Directives::parse(last_user)
    };
    let prompt_tokens = messages
        .iter()
        .map(|m| content_tokens(&m.content) + tokens::MESSAGE_FRAMING_TOKENS)
        .sum::<u32>()
        + req.image_tokens;
    let mut plan = Plan {
        chunks: Vec::new(),
        finish_reason: "stop",
        prompt_tokens,
        completion_tokens: 0,
        fault: directives.fault,
        ttft: directives.ttft,
        tokens_per_sec: directives.tps,
        tool_calls: Vec::new(),
    };
    if !continuing {
        let hash = request_hash(seed, req);
        plan.tool_calls = tools::calls(req, directives.tool.as_ref(), last_user, hash);
    }
    if !plan.tool_calls.is_empty() {
        plan.finish_reason = "tool_calls";
        plan.completion_tokens = plan
            .tool_calls
            .iter()
            .map(|c| {
                tokens::count(Encoding::Cl100kBase, &c.name)
                    + tokens::count(Encoding::Cl100kBase, &c.arguments)
            })
            .sum();
        return plan;
    }
    let mut chunks = text_chunks(seed, req, &directives, last_user);
    if let Some(max) = req.max_tokens {
        // Each chunk counted once (linear in the reply, however long it is asked to be).
        let mut kept = 0;
        let mut used: u32 = 0;
        for chunk in &chunks {
            used = used.saturating_add(tokens::count(Encoding::Cl100kBase, chunk));
            if used > max {
                plan.finish_reason = "length";
                break;
            }
            kept += 1;
        }
        chunks.truncate(kept);
    }
    plan.completion_tokens = tokens::count(Encoding::Cl100kBase, &chunks.concat());
    plan.chunks = chunks;
    plan
}

fn last_user(messages: &[MockMessage]) -> &str {
    messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .map_or("", |m| m.content.as_str())
}

/// The chunks of a text reply, before `max_tokens` cuts them.
fn text_chunks(seed: u64, req: &MockRequest, d: &Directives, last_user: &str) -> Vec<String> {
    if !req.tool_results.is_empty() {
        return tools::results_reply(&req.tool_results);
    }
    if let Some(schema) = &req.json_schema {
        let value = tools::schema_value(schema, &strip_directives(last_user));
        return fragments(&value.to_string(), JSON_CHUNK_CHARS);
    }
    let mut chunks = words_reply(seed, &req.messages, d, last_user);
    if req.json_object {
        let reply = serde_json::json!({ "reply": chunks.concat() });
        return fragments(&reply.to_string(), JSON_CHUNK_CHARS);
    }
    if req.images > 0 {
        if let Some(first) = chunks.first_mut() {
            first.insert(0, ' ');
        }
        let plural = if req.images == 1 { "image" } else { "images" };
        chunks.insert(0, format!("I see {} {plural}.", req.images));
    }
    chunks
}

/// The random words reply (the one every plain text request gets).
fn words_reply(
    seed: u64,
    messages: &[MockMessage],
    d: &Directives,
    last_user: &str,
) -> Vec<String> {
    let mut rng = SplitMix64(fnv1a(seed, messages));
    let n_words = d.words.unwrap_or_else(|| 8 + (rng.next() % 24) as usize);
    let mut chunks = Vec::with_capacity(n_words + 1);
    if d.echo {
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
    chunks
}

/// `text` in pieces of at most `max_chars` characters (never splitting a character).
pub(super) fn fragments(text: &str, max_chars: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    chars
        .chunks(max_chars.max(1))
        .map(|c| c.iter().collect())
        .collect()
}

/// `text` without its `[[mock:…]]` directives, trimmed.
pub(super) fn strip_directives(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("[[mock:") {
        let Some(end) = rest[start..].find("]]") else {
            break;
        };
        out.push_str(&rest[..start]);
        rest = &rest[start + end + 2..];
    }
    out.push_str(rest);
    out.trim().to_owned()
}

/// Which tools a `tool` directive asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ToolDirective {
    /// `tool`: the first tool, or the one the choice names.
    First,
    /// `tool=NAME`.
    Named(String),
    /// `tools=N`.
    Count(usize),
}

#[derive(Debug, Default)]
struct Directives {
    fault: Option<Fault>,
    ttft: Option<Duration>,
    tps: Option<f64>,
    words: Option<usize>,
    echo: bool,
    tool: Option<ToolDirective>,
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
                    // Values out of range are ignored, as unknown directives are: a prompt
                    // cannot ask the mock for a panic, an endless wait or unbounded work.
                    ("status", v) => {
                        d.fault = v
                            .parse()
                            .ok()
                            .filter(|s| (100..=599).contains(s))
                            .map(Fault::Status)
                    }
                    ("hang", _) => d.fault = Some(Fault::Hang),
                    ("drop_after", v) => {
                        d.fault = v
                            .parse()
                            .ok()
                            .filter(|n| *n <= MAX_WORDS)
                            .map(Fault::DropAfter)
                    }
                    ("ttft_ms", v) => {
                        d.ttft = v
                            .parse()
                            .ok()
                            .filter(|ms| *ms <= MAX_TTFT_MS)
                            .map(Duration::from_millis)
                    }
                    ("tps", v) => d.tps = v.parse().ok().filter(|t| pace(*t).is_some()),
                    ("words", v) => d.words = v.parse().ok().filter(|n| *n <= MAX_WORDS),
                    ("echo", _) => d.echo = true,
                    ("tool", "") => d.tool = Some(ToolDirective::First),
                    ("tool", v) => d.tool = Some(ToolDirective::Named(v.to_owned())),
                    ("tools", v) => d.tool = v.parse().ok().map(ToolDirective::Count),
                    _ => {}
                }
            }
            rest = &body[end + 2..];
        }
        d
    }
}

/// The most words a reply may be asked for.
pub const MAX_WORDS: usize = 20_000;
/// The longest wait before the first byte a prompt may ask for.
const MAX_TTFT_MS: u64 = 600_000;

/// The gap between chunks at `tps` chunks per second: `None` for a pace that is not a finite
/// rate between one chunk a minute and a million a second (0 means "as fast as possible" and
/// is the caller's to handle).
pub fn pace(tps: f64) -> Option<Duration> {
    (tps.is_finite() && (1.0 / 60.0..=1_000_000.0).contains(&tps))
        .then(|| Duration::from_secs_f64(1.0 / tps))
}

/// FNV-1a, stable across platforms and Rust versions.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    fn eat(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// FNV-1a over the seed and the messages: what seeds the words of a reply.
fn fnv1a(seed: u64, messages: &[MockMessage]) -> u64 {
    hash_messages(seed, messages).0
}

fn hash_messages(seed: u64, messages: &[MockMessage]) -> Fnv {
    let mut h = Fnv::new();
    h.eat(&seed.to_le_bytes());
    for m in messages {
        h.eat(m.role.as_bytes());
        h.eat(&[0]);
        h.eat(m.content.as_bytes());
        h.eat(&[1]);
    }
    h
}

/// The seed and everything of the request that shapes tool calls: what call ids derive from.
/// The cl100k tokens of a message's content, remembered per thread: a conversation sends its
/// whole history with every turn, and counting it afresh each time made the in-process mock
/// (which shares the server's CPU) cost more than the turn it answers.
fn content_tokens(content: &str) -> u32 {
    use std::hash::{BuildHasher, Hasher};
    /// Counts kept per thread before the memory starts over.
    const REMEMBERED: usize = 1 << 16;
    thread_local! {
        static SEEN: std::cell::RefCell<(std::collections::hash_map::RandomState, std::collections::HashMap<u64, u32>)> =
            std::cell::RefCell::default();
    }
    SEEN.with(|seen| {
        let mut seen = seen.borrow_mut();
        let (state, counts) = &mut *seen;
        let mut h = state.build_hasher();
        h.write(content.as_bytes());
        let key = h.finish();
        if let Some(&n) = counts.get(&key) {
            return n;
        }
        if counts.len() >= REMEMBERED {
            counts.clear();
        }
        let n = tokens::count(Encoding::Cl100kBase, content);
        counts.insert(key, n);
        n
    })
}

fn request_hash(seed: u64, req: &MockRequest) -> u64 {
    let mut h = hash_messages(seed, &req.messages);
    for t in &req.tools {
        h.eat(t.name.as_bytes());
        h.eat(&[2]);
        h.eat(t.parameters.to_string().as_bytes());
        h.eat(&[3]);
    }
    match &req.choice {
        MockChoice::Auto => h.eat(b"auto"),
        MockChoice::None => h.eat(b"none"),
        MockChoice::Required => h.eat(b"required"),
        MockChoice::Named(name) => h.eat(format!("named:{name}").as_bytes()),
    }
    h.eat(&(req.images as u64).to_le_bytes());
    h.0
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
#[path = "generator_tests.rs"]
mod tests;
