//! Semantic routing (PROTOCOL §10) against the real server and mock upstream: the held-out
//! slice of the evaluation set routed as the classifier decides it offline (and with few hard
//! prompts sent to the cheap tier), `x-parley-tier` and `options.tier` forcing a tier, unknown
//! tiers refused, an escalation that sticks for `sticky_turns` turns, the tier in usage reports
//! and metrics, and a cached reply of the cheap tier not served to a request that needs the
//! strong one.

use std::sync::Arc;

use crate::common::*;
use parley::config::{Strategy, TargetConfig, TierConfig};
use parley::routing::{eval, Classifier, ExampleSet, Subject, Tiers};
use serde_json::{json, Value};

const FAST_MODEL: &str = "small-model";
const STRONG_MODEL: &str = "big-model";

/// Route `auto`, semantic: tier `fast` → `small-model` on provider `fast`, `strong` →
/// `big-model` on provider `strong`.
fn semantic_route(fast: &str, strong: &str) -> parley::config::RouteConfig {
    let mut auto = route("auto", &[]);
    auto.strategy = Strategy::Semantic;
    auto.tiers = vec![
        TierConfig {
            name: "fast".into(),
            targets: vec![TargetConfig::new(fast, FAST_MODEL)],
            strategy: Strategy::Fallback,
        },
        TierConfig {
            name: "strong".into(),
            targets: vec![TargetConfig::new(strong, STRONG_MODEL)],
            strategy: Strategy::Fallback,
        },
    ];
    auto
}

/// The mock's `up` route plus `auto`: tier `fast` → `small-model`, `strong` → `big-model`, both
/// on the mock upstream; PII redaction off so the server scores exactly the evaluation's text.
fn semantic_config(up: &MockUpstream, sticky_turns: u32) -> parley::config::Config {
    let mut cfg = config_with(Some(up));
    let mut auto = semantic_route("up", "up");
    auto.sticky_turns = sticky_turns;
    auto.pii = parley::guard::pii::PiiMode::Off;
    cfg.routes.push(auto);
    cfg
}

fn wire_messages(item: &eval::Item) -> Vec<Value> {
    item.messages
        .iter()
        .map(|m| json!({"role": m.role.as_str(), "content": m.content.text()}))
        .collect()
}

fn wire_tools(item: &eval::Item) -> Vec<Value> {
    item.tools
        .iter()
        .map(|t| {
            json!({"type": "function", "function": {
                "name": t.name,
                "description": t.description,
                "parameters": {"type": "object", "properties": {}},
            }})
        })
        .collect()
}

async fn completion(server: &TestServer, body: Value, tier: Option<&str>) -> reqwest::Response {
    let mut req = http().post(server.url("/v1/chat/completions")).json(&body);
    if let Some(t) = tier {
        req = req.header("x-parley-tier", t);
    }
    req.send().await.unwrap()
}

/// The tier the server names in `x-parley-tier`, checked against the model that answered.
fn answered_tier(resp: &reqwest::Response) -> String {
    assert_eq!(resp.status(), 200);
    resp.headers()["x-parley-tier"].to_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_held_out_slice_is_routed_as_the_classifier_decides_and_hard_prompts_stay_strong() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start(semantic_config(&up, 0));
    let items = eval::parse(parley::routing::EVAL_SET).unwrap();
    // What the classifier decides offline, with the builtin embedder the server uses.
    let feats = eval::featurise(&items, Some(&parley::cache::embed::Builtin))
        .await
        .unwrap();
    let mut confusion = [0usize; 4];
    let mut tested = 0;
    for (item, f) in items.iter().zip(&feats) {
        if item.split != eval::Split::Test {
            continue;
        }
        tested += 1;
        let expected_strong =
            parley::routing::classifier::probability(&parley::routing::classifier::WEIGHTS, f)
                >= parley::routing::DEFAULT_THRESHOLD;
        let mut body = json!({"model": "auto", "messages": wire_messages(item), "max_tokens": 16});
        if !item.tools.is_empty() {
            body["tools"] = Value::Array(wire_tools(item));
        }
        let resp = completion(&server, body, None).await;
        let tier = answered_tier(&resp);
        let v: Value = resp.json().await.unwrap();
        let model = v["model"].as_str().unwrap().to_owned();
        assert_eq!(
            tier,
            if expected_strong { "strong" } else { "fast" },
            "{}: the server's tier differs from the classifier's",
            item.id
        );
        assert_eq!(
            model,
            if tier == "strong" {
                STRONG_MODEL
            } else {
                FAST_MODEL
            }
        );
        let hard = item.label == parley::routing::Label::Hard;
        confusion[usize::from(hard) * 2 + usize::from(tier == "strong")] += 1;
    }
    assert!(tested >= 150, "held-out slice: {tested}");
    let [easy_fast, _easy_strong, hard_fast, hard_strong] = confusion;
    // The costly error is rare, and the cheap tier still takes a real share.
    assert!(
        hard_fast * 100 <= (hard_fast + hard_strong) * 8,
        "hard prompts sent to the cheap tier: {confusion:?}"
    );
    assert!(
        (easy_fast + hard_fast) * 100 >= tested * 30,
        "cheap share too low: {confusion:?}"
    );

    // The decisions are counted in metrics and usage reports, by tier.
    let metrics = get_text(&server, "/metrics").await;
    let counted = |tier: &str| -> u64 {
        let prefix = format!(
            "parley_tier_decisions_total{{reason=\"classified\",route=\"auto\",tier=\"{tier}\"}} "
        );
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map_or(0, |n| n.trim().parse().unwrap())
    };
    assert_eq!(counted("fast") as usize, easy_fast + hard_fast);
    assert_eq!(counted("strong") as usize, tested - easy_fast - hard_fast);
    // Usage records are written in the background: wait for all of them.
    let report = loop_until_report(&server, tested).await;
    let rows = report["data"].as_array().unwrap();
    let row = |g: &str| rows.iter().find(|r| r["group"] == g).cloned();
    assert_eq!(
        row("fast").map_or(0, |r| r["requests"].as_u64().unwrap()) as usize,
        easy_fast + hard_fast
    );
    assert_eq!(
        row("strong").map_or(0, |r| r["requests"].as_u64().unwrap()) as usize,
        tested - easy_fast - hard_fast
    );
}

/// The usage report grouped by tier, once it counts `n` requests (records are written in the
/// background), polled until a deadline.
async fn loop_until_report(server: &TestServer, n: usize) -> Value {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let v = get_json(server, "/v1/usage?group_by=tier").await;
        let total: u64 = v["data"].as_array().map_or(0, |rows| {
            rows.iter().filter_map(|r| r["requests"].as_u64()).sum()
        });
        if total as usize >= n {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "usage report never counted {n} requests: {v}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_tier_is_forced_by_header_and_option_and_unknown_tiers_are_refused() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start(semantic_config(&up, 0));
    let easy = json!({"model": "auto", "messages": [{"role": "user", "content": "hi!"}]});
    let resp = completion(&server, easy.clone(), None).await;
    assert_eq!(answered_tier(&resp), "fast");
    let resp = completion(&server, easy.clone(), Some("strong")).await;
    assert_eq!(answered_tier(&resp), "strong");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["model"], STRONG_MODEL);
    // A streamed answer names its tier too.
    let mut streamed = easy.clone();
    streamed["stream"] = json!(true);
    let resp = completion(&server, streamed, Some("strong")).await;
    assert_eq!(answered_tier(&resp), "strong");
    assert!(resp.text().await.unwrap().contains(STRONG_MODEL));

    let resp = completion(&server, easy.clone(), Some("huge")).await;
    let body = expect_error(resp, 400, "bad_request").await;
    assert!(body.to_string().contains("fast, strong"), "{body}");
    // A plain route has no tiers.
    let resp = completion(
        &server,
        json!({"model": "up", "messages": [{"role": "user", "content": "hi"}]}),
        Some("fast"),
    )
    .await;
    expect_error(resp, 400, "bad_request").await;

    // Over the WebSocket: `options.tier`.
    let mut ws = Ws::connect(&server, None).await;
    let conv = ws.create("auto").await;
    ws.send(
        json!({"type": "user_message", "conversation": conv, "client_id": "a",
        "content": "hello", "options": {"tier": "strong"}}),
    )
    .await;
    let frames = ws.recv_until(|f| is_end_of(f, "a")).await;
    let done = frames.last().unwrap();
    assert_eq!(done["type"], "done", "{done}");
    assert_eq!(done["tier"], "strong");
    assert_eq!(done["model"], STRONG_MODEL);
    ws.send(
        json!({"type": "user_message", "conversation": conv, "client_id": "b",
        "content": "hello again", "options": {"tier": "medium"}}),
    )
    .await;
    let frames = ws.recv_until(|f| is_end_of(f, "b")).await;
    let err = frames.last().unwrap();
    assert_eq!(err["type"], "error");
    assert_eq!(err["code"], "bad_request");
    // Refused before it was stored.
    let stored = messages(&server, None, &conv).await;
    assert_eq!(stored.len(), 2, "{stored:?}");

    // REST turns: the header, and the tier in the answer.
    let resp = http()
        .post(server.url(&format!("/v1/conversations/{conv}/messages")))
        .header("x-parley-tier", "fast")
        .json(&json!({"content": "and once more"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["tier"], "fast");
    assert_eq!(v["model"], FAST_MODEL);
}

#[tokio::test]
async fn a_cheap_tiers_cached_reply_does_not_answer_a_request_for_the_strong_tier() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start(semantic_config(&up, 0));
    let ask = |tier: &'static str| {
        let server = &server;
        async move {
            let body = json!({"model": "auto", "messages": [
                {"role": "user", "content": "What is the capital of Portugal?"}]});
            let resp = completion(server, body, Some(tier)).await;
            assert_eq!(answered_tier(&resp), tier);
            let v: Value = resp.json().await.unwrap();
            v["model"].as_str().unwrap().to_owned()
        }
    };
    assert_eq!(ask("fast").await, FAST_MODEL);
    let calls = up.requests();
    // The same question on the fast tier is a hit (no upstream call) ...
    assert_eq!(ask("fast").await, FAST_MODEL);
    assert_eq!(up.requests(), calls);
    // ... but not on the strong tier, which keeps its own.
    assert_eq!(ask("strong").await, STRONG_MODEL);
    assert_eq!(up.requests(), calls + 1);
    assert_eq!(ask("strong").await, STRONG_MODEL);
    assert_eq!(up.requests(), calls + 1);
}

#[tokio::test]
async fn an_escalated_conversation_stays_on_the_strong_tier_for_sticky_turns() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start(semantic_config(&up, 2));
    let conv = create_conversation(&server, None, json!({"model": "auto"})).await;
    let classifier = Classifier::new(
        Arc::new(parley::cache::embed::Builtin),
        vec![Arc::new(ExampleSet::new(
            parley::routing::default_examples(),
        ))],
    );
    classifier.warm().await;
    let tiers = Tiers {
        names: vec!["fast".into(), "strong".into()],
        thresholds: vec![parley::routing::DEFAULT_THRESHOLD],
        sticky_turns: 2,
    };
    let turns = [
        "Design a sharded rate limiter for a multi-region API gateway: compare token buckets and sliding windows, explain the trade-offs of keeping counters in Redis versus locally, handle clock skew and node failure, and give the data structures and the failure modes step by step.",
        "thanks!",
        "ok",
        "hi",
    ];
    let mut history: Vec<parley::domain::Message> = Vec::new();
    let mut got = Vec::new();
    let mut alone = Vec::new();
    for content in turns {
        history.push(parley::domain::Message::text(
            parley::domain::Role::User,
            content,
        ));
        // What the classifier alone says of this turn, with the context the server sends.
        let scored = classifier.score(&Subject::of(&history, 0), true).await;
        alone.push(tiers.names[tiers.for_score(scored.score)].clone());
        let resp = http()
            .post(server.url(&format!("/v1/conversations/{conv}/messages")))
            .json(&json!({"content": content}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let v: Value = resp.json().await.unwrap();
        got.push(v["tier"].as_str().unwrap().to_owned());
        history.push(parley::domain::Message::text(
            parley::domain::Role::Assistant,
            v["message"]["content"].as_str().unwrap(),
        ));
    }
    // The classifier escalates the first turn only; the next two stay escalated, the fourth
    // is the classifier's again.
    assert_eq!(
        alone,
        ["strong", "fast", "fast", "fast"],
        "classifier alone"
    );
    assert_eq!(got, ["strong", "strong", "strong", "fast"], "server");
    // Sticky turns are counted as such.
    let metrics = get_text(&server, "/metrics").await;
    assert!(
        metrics.contains(
            "parley_tier_decisions_total{reason=\"sticky\",route=\"auto\",tier=\"strong\"} 2"
        ),
        "{metrics}"
    );
}

/// A key restricted to regions is never sent to a tier outside them: a prompt the classifier
/// gives the cheap tier goes to the nearest tier its regions allow (reason `region`), and
/// forcing a tier it may not use is `forbidden` before anything reaches an upstream.
#[tokio::test]
async fn a_tier_outside_a_keys_regions_gives_way_to_one_inside() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let mut cfg = config_with(None);
    for (name, region) in [("us", "us-east"), ("eu", "eu-west")] {
        let mut p = openai_provider(name, &up.base_url());
        p.region = Some(region.into());
        cfg.providers.push(p);
    }
    cfg.routes.push(semantic_route("us", "eu"));
    let server = TestServer::start_with_admin(cfg);
    let (_, anywhere) = server.create_key(json!({"tenant": "t"})).await;
    let (_, eu_only) = server
        .create_key(json!({"tenant": "t", "regions": ["eu-west"]}))
        .await;
    let ask = |key: String, tier: Option<&'static str>| {
        let url = server.url("/v1/chat/completions");
        async move {
            let mut req = http().post(url).bearer_auth(key).json(
                &json!({"model": "auto", "messages": [{"role": "user", "content": "hi, thanks!"}]}),
            );
            if let Some(t) = tier {
                req = req.header("x-parley-tier", t);
            }
            req.send().await.unwrap()
        }
    };
    // Anywhere, the classifier's choice: the cheap tier.
    let resp = ask(anywhere.clone(), None).await;
    assert_eq!(answered_tier(&resp), "fast");
    // Held to eu-west: the strong tier, the only one with a target there.
    let resp = ask(eu_only.clone(), None).await;
    assert_eq!(answered_tier(&resp), "strong");
    assert_eq!(resp.json::<Value>().await.unwrap()["model"], STRONG_MODEL);
    let before = up.requests();
    let resp = ask(eu_only, Some("fast")).await;
    expect_error(resp, 403, "forbidden").await;
    assert_eq!(
        up.requests(),
        before,
        "a forbidden request reached the upstream"
    );
    let metrics = get_text(&server, "/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("parley_tier_decisions_total")
                && l.contains(r#"reason="region""#)
                && l.contains(r#"tier="strong""#)),
        "{metrics}"
    );
}
