//! Upstream faults against real mock-upstream servers: rate-limit buckets and their wait queue,
//! `Retry-After`, circuit breakers, time-to-first-token timeouts, broken streams and
//! continue-on-fallback, every target down; several keys per provider, routing strategies,
//! errors that must not be retried, the Anthropic wire format, and `/admin/providers`.

use std::time::{Duration, Instant};

use parley::config::{Config, ProviderConfig, ProviderKind, RetryConfig, RouteConfig, Strategy};
use parley::limits::BreakerConfig;
use parley::provider::CONTINUE_INSTRUCTION;
use serde_json::{json, Value};

use crate::common::*;

/// Retries as these tests want them: two more passes over the targets, short backoff.
fn with_retries(cfg: &mut Config) {
    cfg.retry = RetryConfig {
        max_retries: 2,
        base_ms: 50,
        cap_ms: 200,
        budget_ms: 5000,
    };
}

/// Providers `a` and `b` (OpenAI-compatible) at two mocks, and route `ab`: `a`, then `b`.
fn two_targets(a: &MockUpstream, b: &MockUpstream) -> Config {
    let mut cfg = config_with(None);
    // These tests count upstream calls of repeated prompts: no semantic cache.
    cfg.cache.enabled = false;
    cfg.providers.push(openai_provider("a", &a.base_url()));
    cfg.providers.push(openai_provider("b", &b.base_url()));
    cfg.routes
        .push(route("ab", &[("a", "model-a"), ("b", "model-b")]));
    cfg
}

/// An Anthropic provider at `base_url`, its key in a fresh environment variable.
fn anthropic_provider(name: &str, base_url: &str) -> ProviderConfig {
    let env = unique_env("PARLEY_IT_ANTHROPIC_KEY");
    std::env::set_var(&env, "sk-ant-it-secret");
    ProviderConfig {
        kind: ProviderKind::Anthropic,
        api_key_env: Some(env),
        ..openai_provider(name, base_url)
    }
}

fn provider_mut<'a>(cfg: &'a mut Config, name: &str) -> &'a mut ProviderConfig {
    cfg.providers.iter_mut().find(|p| p.name == name).unwrap()
}

fn route_mut<'a>(cfg: &'a mut Config, model: &str) -> &'a mut RouteConfig {
    cfg.routes.iter_mut().find(|r| r.model == model).unwrap()
}

/// A breaker that opens on a run of `failures` and stays open `cooldown_ms`.
fn breaker(failures: u32, cooldown_ms: u64) -> BreakerConfig {
    BreakerConfig {
        failures,
        failure_ratio: 0.0,
        min_requests: 1,
        window_secs: 60,
        cooldown_ms,
    }
}

/// `GET /admin/providers` (development mode: no admin key needed): the provider named `name`.
async fn provider_info(server: &TestServer, name: &str) -> Value {
    let resp = http()
        .get(server.url("/admin/providers"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    body["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no provider {name} in {body}"))
        .clone()
}

/// Polls `/admin/providers` until `cond` holds for provider `name`; answers what it showed.
async fn wait_provider(server: &TestServer, name: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let end = Instant::now() + TIMEOUT;
    loop {
        let p = provider_info(server, name).await;
        if cond(&p) {
            return p;
        }
        assert!(Instant::now() < end, "provider {name} never got there: {p}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The only deployment of a provider as `/admin/providers` shows it.
fn only_deployment(p: &Value) -> &Value {
    let ds = p["deployments"].as_array().unwrap();
    assert_eq!(ds.len(), 1, "{p}");
    &ds[0]
}

fn of_type<'a>(frames: &'a [Value], ty: &str) -> Vec<&'a Value> {
    frames.iter().filter(|f| f["type"] == ty).collect()
}

#[track_caller]
fn assert_done(frames: &[Value], provider: &str) -> Value {
    let done = frames.last().unwrap();
    assert_eq!(done["type"], "done", "{frames:?}");
    assert_eq!(done["provider"], provider, "{frames:?}");
    assert!(of_type(frames, "error").is_empty(), "{frames:?}");
    done.clone()
}

#[track_caller]
fn assert_error(frames: &[Value], code: &str) -> Value {
    let err = frames.last().unwrap();
    assert_eq!(err["type"], "error", "{frames:?}");
    assert_eq!(err["code"], code, "{frames:?}");
    assert!(of_type(frames, "done").is_empty(), "{frames:?}");
    err.clone()
}

/// Creates `n` conversations on `model`.
async fn create_many(ws: &mut Ws, model: &str, n: usize) -> Vec<String> {
    let mut convs = Vec::with_capacity(n);
    for _ in 0..n {
        convs.push(ws.create(model).await);
    }
    convs
}

/// Sends `content` to every conversation of `convs` at once (client ids `b0`, `b1`, …).
async fn send_all(ws: &mut Ws, convs: &[String], content: &str) {
    for (i, conv) in convs.iter().enumerate() {
        ws.send(json!({"type": "user_message", "conversation": conv, "client_id": format!("b{i}"), "content": content}))
            .await;
    }
}

/// Reads frames until the turn of every conversation of `convs` ended; answers, in the order of
/// `convs`, each one's frames and when its last frame arrived.
async fn collect_all(ws: &mut Ws, convs: &[String]) -> Vec<(Vec<Value>, Instant)> {
    let mut out: Vec<(Vec<Value>, Option<Instant>)> = vec![(Vec::new(), None); convs.len()];
    let mut ended = 0;
    while ended < convs.len() {
        let f = ws.recv().await;
        let i = convs
            .iter()
            .position(|c| f["conversation"] == c.as_str())
            .unwrap_or_else(|| panic!("frame of no conversation of the burst: {f}"));
        let end = f["type"] == "done" || f["type"] == "error";
        out[i].0.push(f);
        if end {
            assert!(out[i].1.is_none(), "two ends: {:?}", out[i].0);
            out[i].1 = Some(Instant::now());
            ended += 1;
        }
    }
    out.into_iter()
        .map(|(frames, at)| (frames, at.unwrap()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Rate limits: the bucket and its queue, a fallback, Retry-After.

#[tokio::test]
async fn a_burst_past_rpm_waits_in_the_queue_and_no_client_sees_a_rate_limit() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let mut cfg = config_with(Some(&up));
    cfg.cache.enabled = false;
    let p = provider_mut(&mut cfg, "up");
    // 60 a minute: a burst of 60, then one a second.
    p.rpm = 60;
    p.queue_timeout_ms = 5000;
    let server = TestServer::start(cfg);
    let mut ws = Ws::connect(&server, None).await;
    let convs = create_many(&mut ws, "up", 62).await;

    let begun = Instant::now();
    send_all(&mut ws, &convs, "burst [[mock:words=3]]").await;
    // The bucket lets 60 through; the other two wait in the provider's queue.
    let info = wait_provider(&server, "up", |p| p["queued"] == 2).await;
    assert!(
        only_deployment(&info)["rpm_available"].as_f64().unwrap() < 1.0,
        "{info}"
    );
    assert!(up.requests() <= 60, "{}", up.requests());

    let turns = collect_all(&mut ws, &convs).await;
    for (frames, _) in &turns {
        assert_done(frames, "up");
        assert_eq!(of_type(frames, "delta").len(), 3, "{frames:?}");
    }
    let mut ends: Vec<Duration> = turns.iter().map(|(_, at)| *at - begun).collect();
    ends.sort();
    // The 61st request went a second after the burst, the 62nd a second later.
    assert!(ends[60] >= Duration::from_millis(900), "{ends:?}");
    assert!(ends[61] >= Duration::from_millis(1900), "{ends:?}");
    assert!(ends[61] < Duration::from_secs(4), "{ends:?}");
    assert_eq!(up.requests(), 62);
    // Every generation accounted for (the actor hears of an end just after the client does).
    let info = wait_provider(&server, "up", |p| only_deployment(p)["served"] == 62).await;
    assert_eq!(info["queued"], 0, "{info}");
    for conv in &convs {
        let stored = messages(&server, None, conv).await;
        assert_eq!(stored.len(), 2, "{stored:?}");
        assert_eq!(stored[1]["finish_reason"], "stop");
    }
}

#[tokio::test]
async fn a_burst_past_rpm_spills_over_to_the_fallback() {
    let a = MockUpstream::spawn(Behaviour::default()).unwrap();
    let b = MockUpstream::spawn(Behaviour::default()).unwrap();
    let mut cfg = two_targets(&a, &b);
    let p = provider_mut(&mut cfg, "a");
    p.rpm = 5;
    // No waiting for `a`: what its bucket refuses goes to `b` at once.
    p.queue_timeout_ms = 0;
    let server = TestServer::start(cfg);
    let mut ws = Ws::connect(&server, None).await;
    let convs = create_many(&mut ws, "ab", 8).await;

    let begun = Instant::now();
    send_all(&mut ws, &convs, "spill [[mock:words=3]]").await;
    let turns = collect_all(&mut ws, &convs).await;
    let mut by = std::collections::HashMap::new();
    for (frames, at) in &turns {
        let done = frames.last().unwrap();
        assert_eq!(done["type"], "done", "{frames:?}");
        *by.entry(done["provider"].as_str().unwrap().to_owned())
            .or_insert(0) += 1;
        assert!(*at - begun < Duration::from_secs(2), "{frames:?}");
    }
    assert_eq!(by.get("a"), Some(&5), "{by:?}");
    assert_eq!(by.get("b"), Some(&3), "{by:?}");
    assert_eq!(a.requests(), 5);
    assert_eq!(b.requests(), 3);
    let info = provider_info(&server, "a").await;
    let d = only_deployment(&info);
    assert_eq!(d["rpm_capacity"], 5.0, "{info}");
    assert!(d["rpm_available"].as_f64().unwrap() < 1.0, "{info}");
}

/// A turn on a provider (with `rpm`, 0 = unlimited) whose first answer is a 429 with
/// `Retry-After: 1`, and the second a reply: answers how long the turn took.
async fn turn_through_a_429(rpm: u32) -> Duration {
    let up = MockUpstream::spawn(Behaviour {
        rate_limit_rate: 1.0,
        ..Behaviour::default()
    })
    .unwrap();
    let mut cfg = config_with(Some(&up));
    with_retries(&mut cfg);
    provider_mut(&mut cfg, "up").rpm = rpm;
    let server = TestServer::start(cfg);
    let mut ws = Ws::connect(&server, None).await;
    let conv = ws.create("up").await;

    let begun = Instant::now();
    ws.send(json!({"type": "user_message", "conversation": conv, "client_id": "m1", "content": "patience"}))
        .await;
    // Once parley has recorded the 429, the upstream recovers.
    wait_provider(&server, "up", |p| {
        only_deployment(p)["error_rate"].as_f64() > Some(0.0)
    })
    .await;
    assert_eq!(up.requests(), 1);
    up.set_behaviour(Behaviour::default());
    let frames = ws.recv_until(|f| is_end_of(f, "m1")).await;
    let elapsed = begun.elapsed();

    assert_eq!(frames[0]["type"], "ack", "{frames:?}");
    let done = assert_done(&frames, "up");
    assert_eq!(done["finish_reason"], "stop");
    // The backoff alone would be at most 50 ms: the wait is the upstream's Retry-After.
    assert!(elapsed >= Duration::from_millis(900), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    assert!(
        done["ttft_ms"].as_u64().unwrap() >= 900,
        "ttft counts from the first attempt: {done}"
    );
    assert_eq!(up.requests(), 2);
    let text = delta_text(&frames);
    assert_eq!(text, mock_reply(0, &[("user", "patience")]));
    let stored = messages(&server, None, &conv).await;
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert_eq!(stored[1]["content"], text.as_str());
    let sent = up.received();
    assert_eq!(sent[0], sent[1], "the retry sends the same request");
    elapsed
}

#[tokio::test]
async fn a_429_with_retry_after_is_retried_after_a_second_and_succeeds() {
    let elapsed = turn_through_a_429(0).await;
    assert!(elapsed < Duration::from_millis(1600), "{elapsed:?}");
}

#[tokio::test]
async fn a_429_on_a_provider_with_an_rpm_bucket_is_retried_after_a_second_too() {
    // The 429 empties the bucket until the Retry-After; the retry then goes at once, not a
    // whole refill interval (a second at 60 a minute) later.
    let elapsed = turn_through_a_429(60).await;
    assert!(elapsed < Duration::from_millis(1600), "{elapsed:?}");
}

#[tokio::test]
async fn a_429_that_cannot_be_retried_reaches_the_client_with_its_retry_after() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start(config_with(Some(&up)));
    let mut ws = Ws::connect(&server, None).await;
    let conv = ws.create("up").await;
    let frames = ws.turn(&conv, "m1", "too fast [[mock:status=429]]").await;
    let err = assert_error(&frames, "rate_limited");
    assert_eq!(err["retry_after_ms"], 1000, "{err}");
    assert_eq!(err["reply_to"], 1);
    assert_eq!(up.requests(), 1);
    let stored = messages(&server, None, &conv).await;
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert_eq!(stored[0]["content"], "too fast [[mock:status=429]]");
    assert_eq!(stored[1]["content"], "");
    assert_eq!(stored[1]["finish_reason"], "error");
}

// ---------------------------------------------------------------------------------------------
// Failing, hanging and breaking upstreams.

#[tokio::test]
async fn a_failing_primary_is_left_for_the_secondary_and_its_breaker_opens_then_closes() {
    let a = MockUpstream::spawn(Behaviour {
        error_rate: 1.0,
        ..Behaviour::default()
    })
    .unwrap();
    let b = MockUpstream::spawn(Behaviour::default()).unwrap();
    let mut cfg = two_targets(&a, &b);
    provider_mut(&mut cfg, "a").breaker = breaker(3, 1000);
    let server = TestServer::start(cfg);
    let mut ws = Ws::connect(&server, None).await;
    let conv = ws.create("ab").await;

    for i in 1..=3 {
        let content = format!("turn {i}");
        let frames = ws.turn(&conv, &format!("m{i}"), &content).await;
        let done = assert_done(&frames, "b");
        assert_eq!(done["model"], "model-b");
        assert!(of_type(&frames, "notice").is_empty(), "{frames:?}");
        assert_eq!(a.requests(), i);
        assert_eq!(b.requests(), i);
    }
    let info = wait_provider(&server, "a", |p| only_deployment(p)["breaker"] == "open").await;
    let opened = Instant::now();
    assert_eq!(only_deployment(&info)["error_rate"], 1.0, "{info}");
    assert_eq!(only_deployment(&info)["served"], 0, "{info}");

    // Open: `a` is not even asked.
    let frames = ws.turn(&conv, "m4", "turn 4").await;
    assert_done(&frames, "b");
    assert_eq!(a.requests(), 3);
    assert_eq!(b.requests(), 4);

    // `a` recovers; after the cool-down one probe goes to it, and its success closes the breaker.
    a.set_behaviour(Behaviour::default());
    let mut n = 4;
    let probe_at = loop {
        n += 1;
        let frames = ws.turn(&conv, &format!("m{n}"), &format!("turn {n}")).await;
        let done = frames.last().unwrap();
        assert_eq!(done["type"], "done", "{frames:?}");
        if done["provider"] == "a" {
            break opened.elapsed();
        }
        assert_eq!(a.requests(), 3, "a was asked while its breaker was open");
        assert!(opened.elapsed() < Duration::from_secs(5), "never probed");
        // Paces the turns that look for the end of the cool-down.
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(probe_at >= Duration::from_millis(900), "{probe_at:?}");
    assert_eq!(a.requests(), 4);
    wait_provider(&server, "a", |p| only_deployment(p)["breaker"] == "closed").await;
    let b_before = b.requests();
    n += 1;
    let frames = ws.turn(&conv, &format!("m{n}"), &format!("turn {n}")).await;
    assert_done(&frames, "a");
    assert_eq!(a.requests(), 5);
    assert_eq!(b.requests(), b_before);
    let stored = messages(&server, None, &conv).await;
    assert_eq!(stored.len(), 2 * n as usize, "{stored:?}");
    assert!(stored.iter().all(|m| m["finish_reason"] != "error"));
}

#[tokio::test]
async fn a_primary_silent_before_its_first_token_is_abandoned_within_the_ttft_timeout() {
    let a = MockUpstream::spawn(Behaviour {
        ttft: Duration::from_secs(30),
        ..Behaviour::default()
    })
    .unwrap();
    let b = MockUpstream::spawn(Behaviour::default()).unwrap();
    let mut cfg = two_targets(&a, &b);
    route_mut(&mut cfg, "ab").ttft_timeout_ms = 400;
    let mut solo = route("solo", &[("a", "model-a")]);
    solo.ttft_timeout_ms = 300;
    cfg.routes.push(solo);
    let server = TestServer::start(cfg);
    let mut ws = Ws::connect(&server, None).await;

    let conv = ws.create("ab").await;
    let begun = Instant::now();
    let frames = ws.turn(&conv, "m1", "anyone there?").await;
    let elapsed = begun.elapsed();
    let done = assert_done(&frames, "b");
    assert!(elapsed >= Duration::from_millis(400), "{elapsed:?}");
    assert!(elapsed < Duration::from_millis(1500), "{elapsed:?}");
    assert!(done["ttft_ms"].as_u64().unwrap() >= 400, "{done}");
    assert_eq!(
        delta_text(&frames),
        mock_reply(0, &[("user", "anyone there?")])
    );
    assert_eq!(a.requests(), 1);
    assert_eq!(b.requests(), 1);
    // Abandoning a slow upstream closes its request at once (not at its timeout), frees its
    // slot, and says nothing of its health.
    let info = wait_provider(&server, "a", |p| only_deployment(p)["in_flight"] == 0).await;
    assert!(
        begun.elapsed() < Duration::from_millis(1500),
        "the abandoned request was held {:?}",
        begun.elapsed()
    );
    assert_eq!(only_deployment(&info)["breaker"], "closed", "{info}");
    assert_eq!(only_deployment(&info)["error_rate"], 0.0, "{info}");

    // With nothing to fall back to, the client hears of it as promptly.
    let conv = ws.create("solo").await;
    let begun = Instant::now();
    let frames = ws.turn(&conv, "m1", "still there?").await;
    let elapsed = begun.elapsed();
    let err = assert_error(&frames, "upstream_unavailable");
    assert_eq!(err["reply_to"], 1);
    assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
    assert!(elapsed < Duration::from_millis(1500), "{elapsed:?}");
    assert_eq!(a.requests(), 2);
    let stored = messages(&server, None, &conv).await;
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert_eq!(stored[1]["finish_reason"], "error");
}

#[tokio::test]
async fn a_dropped_stream_is_upstream_interrupted_with_the_partial_reply_stored() {
    let a = MockUpstream::spawn(Behaviour::default()).unwrap();
    let b = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start(two_targets(&a, &b));
    let mut ws = Ws::connect(&server, None).await;
    let conv = ws.create("ab").await;
    let content = "cut me off [[mock:drop_after=3]]";
    let frames = ws.turn(&conv, "m1", content).await;

    assert_eq!(of_type(&frames, "delta").len(), 3, "{frames:?}");
    let err = assert_error(&frames, "upstream_interrupted");
    assert_eq!(err["reply_to"], 1);
    let plan = mock_plan(0, &[("user", content)]);
    let partial = plan.chunks[..3].concat();
    assert_eq!(delta_text(&frames), partial);
    let stored = messages(&server, None, &conv).await;
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert_eq!(stored[1]["content"], partial.as_str());
    assert_eq!(stored[1]["finish_reason"], "interrupted");
    // Text was sent: without continue-on-fallback nothing else is asked.
    assert_eq!(a.requests(), 1);
    assert_eq!(b.requests(), 0);
}

/// The frames of a reply that broke after three chunks and continued on `b`: the partial text,
/// then the notice, then the continuation.
#[track_caller]
fn assert_switched(frames: &[Value], partial: &str, continuation: &str) {
    assert_eq!(frames[0]["type"], "ack", "{frames:?}");
    let notice = frames
        .iter()
        .position(|f| f["type"] == "notice")
        .unwrap_or_else(|| panic!("no notice: {frames:?}"));
    assert_eq!(of_type(frames, "notice").len(), 1, "{frames:?}");
    assert_eq!(frames[notice]["code"], "provider_switched", "{frames:?}");
    assert_eq!(frames[notice]["provider"], "b", "{frames:?}");
    assert_eq!(frames[notice]["reply_to"], 1, "{frames:?}");
    assert_eq!(delta_text(&frames[..notice]), partial);
    assert_eq!(delta_text(&frames[notice..]), continuation);
    let done = assert_done(frames, "b");
    assert_eq!(done["finish_reason"], "stop");
    assert_eq!(done["model"], "model-b");
}

#[tokio::test]
async fn continue_on_fallback_finishes_the_reply_on_the_secondary_without_losing_text() {
    let a = MockUpstream::spawn(Behaviour::default()).unwrap();
    let b = MockUpstream::spawn(Behaviour::default()).unwrap();
    let mut cfg = two_targets(&a, &b);
    route_mut(&mut cfg, "ab").continue_on_fallback = true;
    let server = TestServer::start(cfg);
    let mut ws = Ws::connect(&server, None).await;
    let conv = ws.create("ab").await;
    let content = "tell me everything [[mock:drop_after=3]]";
    let frames = ws.turn(&conv, "m1", content).await;

    let partial = mock_plan(0, &[("user", content)]).chunks[..3].concat();
    // An OpenAI-compatible secondary gets the partial reply and an instruction to continue.
    let continuation = mock_reply(
        0,
        &[
            ("user", content),
            ("assistant", &partial),
            ("user", CONTINUE_INSTRUCTION),
        ],
    );
    assert_switched(&frames, &partial, &continuation);
    let full = format!("{partial}{continuation}");
    assert_eq!(delta_text(&frames), full);
    let stored = messages(&server, None, &conv).await;
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert_eq!(stored[1]["content"], full.as_str());
    assert_eq!(stored[1]["finish_reason"], "stop");

    assert_eq!(a.requests(), 1);
    assert_eq!(b.requests(), 1);
    let sent = &b.received()[0];
    assert_eq!(sent["model"], "model-b");
    assert_eq!(
        sent["messages"],
        json!([
            {"role": "user", "content": content},
            {"role": "assistant", "content": partial},
            {"role": "user", "content": CONTINUE_INSTRUCTION},
        ])
    );

    // The conversation goes on from the whole reply.
    let frames = ws.turn(&conv, "m2", "and then?").await;
    assert_done(&frames, "a");
    let sent = a.received().last().unwrap().clone();
    assert_eq!(sent["messages"][1]["content"], full.as_str());
}

#[tokio::test]
async fn continue_on_fallback_prefills_an_anthropic_secondary() {
    let a = MockUpstream::spawn(Behaviour::default()).unwrap();
    let b = MockUpstream::spawn(Behaviour::default()).unwrap();
    let mut cfg = config_with(None);
    cfg.providers.push(openai_provider("a", &a.base_url()));
    cfg.providers.push(anthropic_provider("b", &b.base_url()));
    let mut r = route("ab", &[("a", "model-a"), ("b", "model-b")]);
    r.continue_on_fallback = true;
    cfg.routes.push(r);
    let server = TestServer::start(cfg);
    let mut ws = Ws::connect(&server, None).await;
    let conv = ws.create("ab").await;
    let content = "a long story [[mock:drop_after=3]]";
    let frames = ws.turn(&conv, "m1", content).await;

    let partial = mock_plan(0, &[("user", content)]).chunks[..3].concat();
    // Anthropic continues from the partial reply as an assistant prefix (and the mock ignores
    // the fault directive of a continuation).
    let continuation = mock_reply(0, &[("user", content), ("assistant", &partial)]);
    assert_switched(&frames, &partial, &continuation);
    let full = format!("{partial}{continuation}");
    let stored = messages(&server, None, &conv).await;
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert_eq!(stored[1]["content"], full.as_str());
    assert_eq!(stored[1]["finish_reason"], "stop");
    assert_eq!(a.requests(), 1);
    assert_eq!(b.requests(), 1);
    assert_eq!(
        b.received()[0]["messages"],
        json!([
            {"role": "user", "content": content},
            {"role": "assistant", "content": partial},
        ])
    );
}

#[tokio::test]
async fn with_every_target_down_the_client_hears_promptly_and_history_is_kept() {
    let a = MockUpstream::spawn(Behaviour::default()).unwrap();
    let b = MockUpstream::spawn(Behaviour::default()).unwrap();
    let mut cfg = two_targets(&a, &b);
    with_retries(&mut cfg);
    provider_mut(&mut cfg, "a").breaker = breaker(3, 15_000);
    provider_mut(&mut cfg, "b").breaker = breaker(3, 15_000);
    let server = TestServer::start(cfg);
    let mut ws = Ws::connect(&server, None).await;
    let conv = ws.create("ab").await;
    let frames = ws.turn(&conv, "m1", "before the outage").await;
    assert_done(&frames, "a");
    let first_reply = delta_text(&frames);
    assert_eq!(a.requests(), 1);
    a.stop();
    b.stop();

    // Connections refused on every target, on every pass.
    let begun = Instant::now();
    let frames = ws.turn(&conv, "m2", "during the outage").await;
    let elapsed = begun.elapsed();
    let err = assert_error(&frames, "upstream_unavailable");
    assert_eq!(err["reply_to"], 3);
    assert_eq!(err["client_id"], "m2");
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
    // Three passes opened both breakers: now the answer comes without trying, with a hint.
    let info = wait_provider(&server, "b", |p| only_deployment(p)["breaker"] == "open").await;
    assert_eq!(only_deployment(&info)["error_rate"], 1.0, "{info}");
    wait_provider(&server, "a", |p| only_deployment(p)["breaker"] == "open").await;
    let begun = Instant::now();
    let frames = ws.turn(&conv, "m3", "still down?").await;
    let elapsed = begun.elapsed();
    let err = assert_error(&frames, "upstream_unavailable");
    assert!(elapsed < Duration::from_millis(500), "{elapsed:?}");
    let hint = err["retry_after_ms"].as_u64().unwrap();
    assert!((10_000..=15_000).contains(&hint), "{err}");

    let stored = messages(&server, None, &conv).await;
    let rows: Vec<(&str, &str, &str)> = stored
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap(),
                m["content"].as_str().unwrap(),
                m["finish_reason"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("user", "before the outage", ""),
            ("assistant", first_reply.as_str(), "stop"),
            ("user", "during the outage", ""),
            ("assistant", "", "error"),
            ("user", "still down?", ""),
            ("assistant", "", "error"),
        ]
    );
    let seqs: Vec<u64> = stored.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5, 6]);
}

// ---------------------------------------------------------------------------------------------
// Deployments, strategies, what is never retried.

#[tokio::test]
async fn a_provider_with_two_keys_has_two_deployments_and_uses_both() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let (k1, k2) = (unique_env("PARLEY_IT_KEY"), unique_env("PARLEY_IT_KEY"));
    std::env::set_var(&k1, "sk-it-first");
    std::env::set_var(&k2, "sk-it-second");
    let mut cfg = config_with(Some(&up));
    let p = provider_mut(&mut cfg, "up");
    p.api_keys_env = vec![k1, k2];
    // One request a minute per key, and no waiting.
    p.rpm = 1;
    p.queue_timeout_ms = 0;
    let server = TestServer::start(cfg);
    let info = provider_info(&server, "up").await;
    assert_eq!(info["deployments"].as_array().unwrap().len(), 2, "{info}");

    let mut ws = Ws::connect(&server, None).await;
    let conv = ws.create("up").await;
    for i in 1..=2 {
        let frames = ws.turn(&conv, &format!("m{i}"), &format!("key {i}")).await;
        assert_done(&frames, "up");
    }
    assert_eq!(up.requests(), 2);
    let info = wait_provider(&server, "up", |p| {
        p["deployments"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["in_flight"] == 0)
    })
    .await;
    for (i, d) in info["deployments"].as_array().unwrap().iter().enumerate() {
        assert_eq!(d["key_index"], i, "{info}");
        assert_eq!(d["served"], 1, "{info}");
        assert_eq!(d["rpm_capacity"], 1.0, "{info}");
        assert!(d["rpm_available"].as_f64().unwrap() < 0.5, "{info}");
    }

    // Both keys spent: nothing can absorb a third request.
    let frames = ws.turn(&conv, "m3", "key 3").await;
    let err = assert_error(&frames, "rate_limited");
    let hint = err["retry_after_ms"].as_u64().unwrap();
    assert!((30_000..=60_000).contains(&hint), "{err}");
    assert_eq!(up.requests(), 2);
    let stored = messages(&server, None, &conv).await;
    assert_eq!(stored.len(), 6, "{stored:?}");
    assert_eq!(stored[4]["content"], "key 3");
    assert_eq!(stored[5]["finish_reason"], "error");
}

#[tokio::test]
async fn weighted_routing_sends_traffic_to_both_targets_by_weight() {
    let a = MockUpstream::spawn(Behaviour::default()).unwrap();
    let b = MockUpstream::spawn(Behaviour::default()).unwrap();
    let mut cfg = two_targets(&a, &b);
    let r = route_mut(&mut cfg, "ab");
    r.strategy = Strategy::Weighted;
    r.targets[0].weight = 3;
    let server = TestServer::start(cfg);
    let mut ws = Ws::connect(&server, None).await;
    const N: usize = 64;
    let convs = create_many(&mut ws, "ab", N).await;
    send_all(&mut ws, &convs, "share [[mock:words=2]]").await;
    let turns = collect_all(&mut ws, &convs).await;
    let mut on_a = 0;
    for (frames, _) in &turns {
        let done = frames.last().unwrap();
        assert_eq!(done["type"], "done", "{frames:?}");
        if done["provider"] == "a" {
            on_a += 1;
        } else {
            assert_eq!(done["provider"], "b", "{frames:?}");
        }
    }
    let on_b = N - on_a;
    assert_eq!(a.requests() as usize, on_a);
    assert_eq!(b.requests() as usize, on_b);
    // 3:1 — a expects 48 of 64; both getting traffic and a getting more is certain but for
    // odds far below one in a million.
    assert!(on_b >= 1, "a {on_a}, b {on_b}");
    assert!(on_a > on_b, "a {on_a}, b {on_b}");
}

#[tokio::test]
async fn least_busy_routing_prefers_the_idle_then_the_faster_target() {
    let a = MockUpstream::spawn(Behaviour {
        ttft: Duration::from_millis(150),
        ..Behaviour::default()
    })
    .unwrap();
    let b = MockUpstream::spawn(Behaviour::default()).unwrap();
    let mut cfg = two_targets(&a, &b);
    route_mut(&mut cfg, "ab").strategy = Strategy::LeastBusy;
    let server = TestServer::start(cfg);
    let mut ws = Ws::connect(&server, None).await;
    let c1 = ws.create("ab").await;
    let c2 = ws.create("ab").await;

    // Both idle and unmeasured: the configured order.
    ws.send(json!({"type": "user_message", "conversation": c1, "client_id": "slow", "content": "slow [[mock:words=10,tps=20]]"}))
        .await;
    assert!(wait_until(TIMEOUT, || a.requests() == 1).await);
    // `a` is busy: the next request goes to `b`, and is done first.
    ws.send(json!({"type": "user_message", "conversation": c2, "client_id": "quick", "content": "quick"}))
        .await;
    let mut dones = 0;
    let frames = ws
        .recv_until(|f| {
            dones += usize::from(f["type"] == "done");
            dones == 2
        })
        .await;
    let of_conv = |c: &str| -> Vec<Value> {
        frames
            .iter()
            .filter(|f| f["conversation"] == c)
            .cloned()
            .collect()
    };
    let (slow, quick) = (of_conv(&c1), of_conv(&c2));
    assert_done(&quick, "b");
    assert_done(&slow, "a");
    let first_done = frames.iter().find(|f| f["type"] == "done").unwrap();
    assert_eq!(first_done["conversation"], c2.as_str(), "{frames:?}");
    assert_eq!(
        delta_text(&slow),
        mock_reply(0, &[("user", "slow [[mock:words=10,tps=20]]")])
    );

    // Both idle again, both measured: `b` answers its first token faster.
    for name in ["a", "b"] {
        wait_provider(&server, name, |p| {
            let d = only_deployment(p);
            d["in_flight"] == 0 && d["ttft_ms"].is_f64()
        })
        .await;
    }
    for i in 0..3 {
        let frames = ws
            .turn(&c2, &format!("again{i}"), &format!("again {i}"))
            .await;
        assert_done(&frames, "b");
    }
    assert_eq!(a.requests(), 1);
    assert_eq!(b.requests(), 4);
}

#[tokio::test]
async fn a_400_is_never_retried_nor_held_against_the_upstream() {
    let a = MockUpstream::spawn(Behaviour::default()).unwrap();
    let b = MockUpstream::spawn(Behaviour::default()).unwrap();
    let mut cfg = two_targets(&a, &b);
    with_retries(&mut cfg);
    provider_mut(&mut cfg, "a").breaker = breaker(2, 60_000);
    let server = TestServer::start(cfg);
    let mut ws = Ws::connect(&server, None).await;
    let conv = ws.create("ab").await;

    for i in 1..=2u64 {
        let begun = Instant::now();
        let frames = ws
            .turn(&conv, &format!("m{i}"), "bad [[mock:status=400]]")
            .await;
        assert!(begun.elapsed() < Duration::from_secs(1));
        let err = assert_error(&frames, "upstream_error");
        assert!(err.get("retry_after_ms").is_none(), "{err}");
        // Exactly one upstream request: no second pass, no other target.
        assert_eq!(a.requests(), i);
        assert_eq!(b.requests(), 0);
    }
    // The upstream refused a request; it is not down: its breaker stays closed.
    let info = provider_info(&server, "a").await;
    assert_eq!(only_deployment(&info)["breaker"], "closed", "{info}");
    let frames = ws.turn(&conv, "m3", "a good one").await;
    assert_done(&frames, "a");
    assert_eq!(a.requests(), 3);
    assert_eq!(b.requests(), 0);
}

// ---------------------------------------------------------------------------------------------
// Anthropic.

#[tokio::test]
async fn an_anthropic_provider_streams_and_stores_the_reply() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let mut cfg = config_with(None);
    cfg.providers
        .push(anthropic_provider("claude", &up.base_url()));
    cfg.routes
        .push(route("claude", &[("claude", "claude-mock")]));
    let server = TestServer::start(cfg);
    let mut ws = Ws::connect(&server, None).await;
    let conv = ws.create("claude").await;
    let frames = ws.turn(&conv, "m1", "hello claude").await;

    let done = assert_done(&frames, "claude");
    assert_eq!(done["model"], "claude-mock");
    assert_eq!(done["finish_reason"], "stop");
    assert!(of_type(&frames, "delta").len() > 1, "{frames:?}");
    let plan = mock_plan(0, &[("user", "hello claude")]);
    let text = delta_text(&frames);
    assert_eq!(text, plan.text());
    assert_eq!(done["usage"]["prompt_tokens"], plan.prompt_tokens);
    assert_eq!(done["usage"]["completion_tokens"], plan.completion_tokens);
    let stored = messages(&server, None, &conv).await;
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert_eq!(stored[1]["content"], text.as_str());
    assert_eq!(stored[1]["finish_reason"], "stop");

    assert_eq!(up.requests(), 1);
    let sent = &up.received()[0];
    assert_eq!(sent["model"], "claude-mock");
    assert_eq!(sent["stream"], true);
    assert!(sent["max_tokens"].as_u64().is_some_and(|n| n > 0), "{sent}");
    assert_eq!(
        sent["messages"],
        json!([{"role": "user", "content": "hello claude"}])
    );

    // History goes along on the next turn, in alternating roles.
    let frames = ws.turn(&conv, "m2", "more please").await;
    assert_done(&frames, "claude");
    assert_eq!(
        up.received()[1]["messages"],
        json!([
            {"role": "user", "content": "hello claude"},
            {"role": "assistant", "content": text},
            {"role": "user", "content": "more please"},
        ])
    );
}

#[tokio::test]
async fn an_anthropic_529_is_a_retryable_failure_that_falls_back() {
    let claude_up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let openai_up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let mut cfg = config_with(None);
    with_retries(&mut cfg);
    let mut claude = anthropic_provider("claude", &claude_up.base_url());
    claude.breaker = breaker(3, 60_000);
    cfg.providers.push(claude);
    cfg.providers
        .push(openai_provider("up", &openai_up.base_url()));
    cfg.routes
        .push(route("cu", &[("claude", "claude-mock"), ("up", "mock-1")]));
    let server = TestServer::start(cfg);
    let mut ws = Ws::connect(&server, None).await;
    let conv = ws.create("cu").await;

    // Overloaded: each pass tries Claude, then falls back (the mock overloads the fallback too,
    // since the fault is asked for by the message itself), and the pass is retried.
    let frames = ws.turn(&conv, "m1", "busy [[mock:status=529]]").await;
    let err = assert_error(&frames, "upstream_error");
    assert!(err["message"].as_str().unwrap().contains("529"), "{err}");
    assert_eq!(claude_up.requests(), 3);
    assert_eq!(openai_up.requests(), 3);
    // Three 529s in a row opened Claude's breaker …
    let info = wait_provider(&server, "claude", |p| {
        only_deployment(p)["breaker"] == "open"
    })
    .await;
    assert_eq!(only_deployment(&info)["error_rate"], 1.0, "{info}");

    // … so the next message goes to the fallback directly, and succeeds.
    let frames = ws.turn(&conv, "m2", "hello after the rush").await;
    let done = assert_done(&frames, "up");
    assert_eq!(done["model"], "mock-1");
    assert_eq!(claude_up.requests(), 3);
    assert_eq!(openai_up.requests(), 4);
    let stored = messages(&server, None, &conv).await;
    assert_eq!(stored.len(), 4, "{stored:?}");
    assert_eq!(stored[3]["content"], delta_text(&frames).as_str());
}

// ---------------------------------------------------------------------------------------------
// Administration.

#[tokio::test]
async fn admin_providers_shows_breaker_state_and_bucket_levels() {
    let up = MockUpstream::spawn(Behaviour {
        error_rate: 1.0,
        ..Behaviour::default()
    })
    .unwrap();
    let mut cfg = config_with(Some(&up));
    let p = provider_mut(&mut cfg, "up");
    // Slow refills (one request and one token a second), so the levels show what was taken.
    p.rpm = 60;
    p.tpm = 60;
    p.max_concurrency = 4;
    p.breaker = breaker(2, 60_000);
    let server = TestServer::start(cfg);

    let info = provider_info(&server, "up").await;
    let d = only_deployment(&info);
    assert_eq!(d["breaker"], "closed", "{info}");
    assert_eq!(d["rpm_available"], 60.0, "{info}");
    assert_eq!(d["tpm_available"], 60.0, "{info}");

    let mut ws = Ws::connect(&server, None).await;
    let conv = ws.create("up").await;
    for i in 1..=2 {
        let frames = ws.turn(&conv, &format!("m{i}"), &format!("fail {i}")).await;
        assert_error(&frames, "upstream_error");
    }
    assert_eq!(up.requests(), 2);
    let info = wait_provider(&server, "up", |p| only_deployment(p)["breaker"] == "open").await;
    assert_eq!(info["queued"], 0, "{info}");
    let d = only_deployment(&info);
    assert_eq!(d["key_index"], 0, "{info}");
    assert_eq!(d["in_flight"], 0, "{info}");
    assert_eq!(d["max_concurrency"], 4, "{info}");
    assert_eq!(d["rpm_capacity"], 60.0, "{info}");
    assert_eq!(d["tpm_capacity"], 60.0, "{info}");
    // Two requests taken, a little refilled since.
    let rpm = d["rpm_available"].as_f64().unwrap();
    assert!((58.0..59.9).contains(&rpm), "{info}");
    // Their prompt tokens taken too (a failed request gives none back).
    let tpm = d["tpm_available"].as_f64().unwrap();
    assert!((0.0..56.0).contains(&tpm), "{info}");
    assert_eq!(d["error_rate"], 1.0, "{info}");
    assert_eq!(d["served"], 0, "{info}");
    assert!(d["ttft_ms"].is_null(), "{info}");
    let builtin = provider_info(&server, "mock").await;
    assert_eq!(only_deployment(&builtin)["breaker"], "closed", "{builtin}");

    // Open: refused without asking the upstream, with how long it stays open.
    let frames = ws.turn(&conv, "m3", "refused").await;
    let err = assert_error(&frames, "upstream_unavailable");
    let hint = err["retry_after_ms"].as_u64().unwrap();
    assert!((50_000..=60_000).contains(&hint), "{err}");
    assert_eq!(up.requests(), 2);
}

/// One request's retries count once toward the breaker: a prompt that fails on every attempt
/// (three passes) does not open the deployment for the next, healthy request.
#[tokio::test]
async fn one_requests_retries_do_not_open_the_breaker_for_everyone() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let mut cfg = config_with(Some(&up));
    cfg.cache.enabled = false;
    with_retries(&mut cfg);
    provider_mut(&mut cfg, "up").breaker = breaker(3, 15_000);
    let server = TestServer::start(cfg);
    let ask = |content: &str| {
        http()
            .post(server.url("/v1/chat/completions"))
            .json(&json!({"model": "up", "messages": [{"role": "user", "content": content}]}))
            .send()
    };
    let before = up.requests();
    let resp = ask("always fails [[mock:status=500]]").await.unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(up.requests(), before + 3, "three attempts");
    let info = provider_info(&server, "up").await;
    assert_eq!(info["deployments"][0]["breaker"], "closed", "{info}");
    let resp = ask("a healthy question").await.unwrap();
    assert_eq!(resp.status(), 200);
}

/// The prompt's size is counted only when something needs it before the answer; a provider
/// with a tokens-per-minute limit is such a thing. A stateless request to it takes its counted
/// prompt from the bucket (a failed request gives none back, so the level shows the taking).
#[tokio::test]
async fn a_stateless_request_reserves_its_counted_prompt_with_a_provider_that_limits_tokens() {
    let up = MockUpstream::spawn(Behaviour {
        error_rate: 1.0,
        ..Behaviour::default()
    })
    .unwrap();
    let mut cfg = config_with(Some(&up));
    // 20 tokens a second: what was taken stays visible for the test's duration.
    provider_mut(&mut cfg, "up").tpm = 1200;
    let server = TestServer::start(cfg);
    let resp = http()
        .post(server.url("/v1/chat/completions"))
        .json(
            &json!({"model": "up", "messages": [{"role": "user", "content": "word ".repeat(300)}]}),
        )
        .send()
        .await
        .unwrap();
    expect_error(resp, 502, "upstream_error").await;
    assert_eq!(up.requests(), 1);
    let d = only_deployment(&provider_info(&server, "up").await).clone();
    // About 300 prompt tokens taken (1 200 would be left had the prompt not been counted),
    // less what refilled since (20 a second).
    let tpm = d["tpm_available"].as_f64().unwrap();
    assert!((850.0..1100.0).contains(&tpm), "{d}");
}

/// An upstream that reports no usage: the reply's usage carries parley's own count of the
/// prompt (taken only then) and of the reply.
#[tokio::test]
async fn an_answer_without_usage_is_billed_by_parleys_own_count() {
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = upstream.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        while let Ok((mut sock, _)) = upstream.accept().await {
            tokio::spawn(async move {
                // Read the head and the body its content-length announces.
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let n = sock.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&got).to_lowercase();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text[..end]
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if got.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
                let body = json!({
                    "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": "two words"}}]
                })
                .to_string();
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(body.as_bytes()).await;
            });
        }
    });
    let mut cfg = config_with(None);
    cfg.providers
        .push(openai_provider("bare", &format!("http://{addr}/v1")));
    cfg.routes.push(route("bare", &[("bare", "m")]));
    let server = TestServer::start(cfg);
    let resp = http()
        .post(server.url("/v1/chat/completions"))
        .json(&json!({"model": "bare", "messages": [{"role": "user", "content": "word ".repeat(300)}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body["choices"][0]["message"]["content"], "two words",
        "{body}"
    );
    let prompt = body["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!((300..320).contains(&prompt), "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 2, "{body}");
}
