//! Gateway governance: per-key limits and quotas refused before any upstream call, usage and
//! cost attribution, versioned prompts, data residency.

use std::collections::HashMap;

use parley::tenant::Price;
use serde_json::{json, Value};

use crate::common::*;

async fn post_turn(server: &TestServer, key: &str, conv: &str, body: Value) -> reqwest::Response {
    http()
        .post(server.url(&format!("/v1/conversations/{conv}/messages")))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn admin_get(server: &TestServer, path: &str) -> reqwest::Response {
    http()
        .get(server.url(path))
        .bearer_auth(server.admin_key.as_deref().unwrap())
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_key_past_its_rpm_is_refused_before_any_upstream_call() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start_with_admin(config_with(Some(&up)));
    // Creating the conversation is a request too: it and two turns make three.
    let (_, key) = server.create_key(json!({"tenant": "acme", "rpm": 3})).await;
    let conv = create_conversation(&server, Some(&key), json!({"model": "up"})).await;
    for i in 0..2 {
        let resp = post_turn(
            &server,
            &key,
            &conv,
            json!({"content": format!("q{i}"), "client_id": format!("c{i}")}),
        )
        .await;
        assert_eq!(resp.status(), 200);
    }
    let resp = post_turn(
        &server,
        &key,
        &conv,
        json!({"content": "one too many", "client_id": "c2"}),
    )
    .await;
    assert!(resp.headers().get("retry-after").is_some());
    expect_error(resp, 429, "rate_limited").await;
    assert_eq!(up.requests(), 2, "the refused turn reached the upstream");
    // Nothing was stored for it either.
    assert_eq!(messages(&server, Some(&key), &conv).await.len(), 4);

    // Over the WebSocket: an error frame with retry_after_ms, the socket stays usable.
    let mut ws = Ws::connect(&server, Some(&key)).await;
    ws.send(
        json!({"type": "user_message", "conversation": conv, "client_id": "w1", "content": "hi"}),
    )
    .await;
    let err = ws.recv().await;
    assert_eq!(err["type"], "error");
    assert_eq!(err["code"], "rate_limited");
    assert!(err["retry_after_ms"].as_u64().unwrap() > 1000, "{err}");
    assert_eq!(up.requests(), 2);
    // Creating conversations is metered as well: no more than the key's requests a minute.
    let resp = with_key(http().post(server.url("/v1/conversations")), Some(&key))
        .json(&json!({"model": "up"}))
        .send()
        .await
        .unwrap();
    expect_error(resp, 429, "rate_limited").await;
    ws.send(json!({"type": "create", "client_id": "c", "model": "up"}))
        .await;
    assert_eq!(ws.recv().await["code"], "rate_limited");
}

#[tokio::test]
async fn tpm_and_daily_budgets_are_enforced_with_reservations() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start_with_admin(config_with(Some(&up)));
    // Each turn reserves its prompt plus max_tokens (40): after a first turn that really used
    // some 50 tokens, a 60-token day cannot hold the second one's reservation.
    let (_, daily) = server
        .create_key(json!({"tenant": "acme", "daily_tokens": 60}))
        .await;
    let conv = create_conversation(&server, Some(&daily), json!({"model": "up"})).await;
    let opts = json!({"max_tokens": 40});
    let resp = post_turn(
        &server,
        &daily,
        &conv,
        json!({"content": "a [[mock:words=30]]", "client_id": "a", "options": opts}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let resp = post_turn(
        &server,
        &daily,
        &conv,
        json!({"content": "b", "client_id": "b", "options": opts}),
    )
    .await;
    let body = expect_error(resp, 429, "quota_exceeded").await;
    assert!(
        body["error"]["message"].as_str().unwrap().contains("daily"),
        "{body}"
    );
    assert_eq!(up.requests(), 1);

    // 100 tokens a minute: the first turn's reservation (about 56) fits, the second's (prompt
    // with history plus 70) does not fit what the first left, even after the bucket has refilled
    // for several seconds (1.7 tokens a second) on a busy machine.
    let opts = json!({"max_tokens": 50});
    let (_, tpm) = server
        .create_key(json!({"tenant": "acme", "tpm": 100}))
        .await;
    let conv = create_conversation(&server, Some(&tpm), json!({"model": "up"})).await;
    let resp = post_turn(
        &server,
        &tpm,
        &conv,
        json!({"content": "a", "client_id": "a", "options": opts}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let resp = post_turn(
        &server,
        &tpm,
        &conv,
        json!({"content": "b", "client_id": "b", "options": {"max_tokens": 70}}),
    )
    .await;
    expect_error(resp, 429, "rate_limited").await;
    assert_eq!(up.requests(), 2);
}

#[tokio::test]
async fn usage_adds_up_to_what_the_upstream_reported_and_survives_a_restart() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config_with(Some(&up));
    cfg.prices = HashMap::from([(
        "mock-1".to_owned(),
        Price {
            input_per_mtok: 1.0,
            output_per_mtok: 2.0,
        },
    )]);
    let server = TestServer::start_in(cfg.clone(), tmp.path(), Some("adm".into()));
    let (key_id, key) = server.create_key(json!({"tenant": "acme"})).await;
    let mut ws = Ws::connect(&server, Some(&key)).await;
    let conv = ws.create("up").await;
    let mut reported = (0u64, 0u64);
    for i in 0..3 {
        let frames = ws
            .turn(&conv, &format!("u{i}"), &format!("question {i}"))
            .await;
        let done = frames.last().unwrap();
        reported.0 += done["usage"]["prompt_tokens"].as_u64().unwrap();
        reported.1 += done["usage"]["completion_tokens"].as_u64().unwrap();
    }
    // A cancelled stream is billed for what it generated.
    ws.send(
        json!({"type": "user_message", "conversation": conv, "client_id": "slow",
                   "content": "long [[mock:words=300,tps=50]]"}),
    )
    .await;
    ws.recv_until(|f| f["type"] == "delta").await;
    ws.send(json!({"type": "cancel", "conversation": conv}))
        .await;
    let frames = ws.recv_until(|f| f["type"] == "done").await;
    let done = frames.last().unwrap();
    assert_eq!(done["finish_reason"], "cancelled");
    let cancelled_completion = done["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(cancelled_completion > 0);
    reported.0 += done["usage"]["prompt_tokens"].as_u64().unwrap();
    reported.1 += cancelled_completion;
    drop(ws);

    let expected_cost = (reported.0 as f64 * 1.0 + reported.1 as f64 * 2.0) / 1e6;
    let check = |v: &Value| {
        let total = &v["total"];
        assert_eq!(total["requests"], 4, "{v}");
        assert_eq!(total["prompt_tokens"].as_u64().unwrap(), reported.0, "{v}");
        assert_eq!(
            total["completion_tokens"].as_u64().unwrap(),
            reported.1,
            "{v}"
        );
        assert!(
            (total["cost"].as_f64().unwrap() - expected_cost).abs() < 1e-9,
            "{v}"
        );
    };
    // Usage is written in batches: wait for the batch, then read it as the tenant.
    let own = |s: &TestServer| {
        let url = s.url("/v1/usage?group_by=conversation");
        let key = key.clone();
        async move {
            http()
                .get(url)
                .bearer_auth(key)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    let mut v = own(&server).await;
    for _ in 0..100 {
        if v["total"]["requests"] == 4 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        v = own(&server).await;
    }
    check(&v);
    assert_eq!(v["data"][0]["group"], conv.as_str());
    server.stop();

    // After a graceful restart every record is still there, and the admin sees it per key.
    let server = TestServer::start_in(cfg, tmp.path(), Some("adm".into()));
    check(&own(&server).await);
    let v: Value = admin_get(&server, "/admin/usage?tenant=acme&group_by=key")
        .await
        .json()
        .await
        .unwrap();
    check(&v);
    assert_eq!(v["data"][0]["group"], key_id.as_str());
    let csv = admin_get(
        &server,
        "/admin/usage?tenant=acme&group_by=model&format=csv",
    )
    .await;
    assert!(csv.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/csv"));
    let csv = csv.text().await.unwrap();
    assert!(csv.starts_with("group,requests,"), "{csv}");
    assert!(
        csv.contains(&format!("mock-1,4,0,{},{}", reported.0, reported.1)),
        "{csv}"
    );
    // Another tenant sees none of it.
    let (_, other) = server.create_key(json!({"tenant": "other"})).await;
    let v = get_json_as(&server, "/v1/usage", Some(&other)).await;
    assert_eq!(v["total"]["requests"], 0, "{v}");
}

#[tokio::test]
async fn prompt_versions_pin_and_latest_follows() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start_with_admin(config_with(Some(&up)));
    let admin = server.admin_key.clone().unwrap();
    let put = |content: &str| {
        http()
            .put(server.url("/admin/prompts/support"))
            .bearer_auth(&admin)
            .json(&json!({"content": content}))
            .send()
    };
    let v1: Value = put("You are support, version one.")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v1["version"], 1);
    let v2: Value = put("You are support, version two.")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v2["version"], 2);
    let (_, key) = server.create_key(json!({"tenant": "acme"})).await;
    let pinned = create_conversation(
        &server,
        Some(&key),
        json!({"model": "up", "prompt": "support@1"}),
    )
    .await;
    let latest = create_conversation(
        &server,
        Some(&key),
        json!({"model": "up", "prompt": "support@latest"}),
    )
    .await;
    let missing = http()
        .post(server.url("/v1/conversations"))
        .bearer_auth(&key)
        .json(&json!({"model": "up", "prompt": "support@9"}))
        .send()
        .await
        .unwrap();
    expect_error(missing, 404, "not_found").await;

    let mut ws = Ws::connect(&server, Some(&key)).await;
    ws.turn(&pinned, "a", "hello").await;
    ws.turn(&latest, "b", "hello").await;
    put("You are support, version three.").await.unwrap();
    ws.turn(&latest, "c", "again").await;
    let systems: Vec<String> = up
        .received()
        .iter()
        .map(|r| r["messages"][0]["content"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        systems,
        [
            "You are support, version one.",
            "You are support, version two.",
            "You are support, version three."
        ]
    );
    let stored = messages(&server, Some(&key), &latest).await;
    assert_eq!(stored[1]["prompt_version"], "support@2");
    assert_eq!(stored[3]["prompt_version"], "support@3");
    assert_eq!(
        messages(&server, Some(&key), &pinned).await[1]["prompt_version"],
        "support@1"
    );

    let listed: Value = admin_get(&server, "/admin/prompts/support")
        .await
        .json()
        .await
        .unwrap();
    let versions: Vec<u64> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, [1, 2, 3]);
    expect_error(
        admin_get(&server, "/admin/prompts/nope").await,
        404,
        "not_found",
    )
    .await;
}

#[tokio::test]
async fn a_key_restricted_to_a_region_never_reaches_another() {
    let us = MockUpstream::spawn(Behaviour::default()).unwrap();
    let eu = MockUpstream::spawn(Behaviour::default()).unwrap();
    let mut cfg = config_with(None);
    let mut p = openai_provider("us", &us.base_url());
    p.region = Some("us-east".into());
    cfg.providers.push(p);
    let mut p = openai_provider("eu", &eu.base_url());
    p.region = Some("eu-west".into());
    cfg.providers.push(p);
    cfg.routes
        .push(route("both", &[("us", "mock-1"), ("eu", "mock-1")]));
    let mut eu_only = route("eu-only", &[("us", "mock-1"), ("eu", "mock-1")]);
    eu_only.regions = Some(vec!["eu-west".into()]);
    cfg.routes.push(eu_only);
    let server = TestServer::start_with_admin(cfg);

    let (_, eu_key) = server
        .create_key(json!({"tenant": "acme", "regions": ["eu-west"]}))
        .await;
    let conv = create_conversation(&server, Some(&eu_key), json!({"model": "both"})).await;
    for i in 0..3 {
        let resp = post_turn(
            &server,
            &eu_key,
            &conv,
            json!({"content": format!("q{i}"), "client_id": format!("c{i}")}),
        )
        .await;
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["provider"], "eu", "{body}");
    }
    // Even when the eu target fails, the request does not fall back to us.
    let resp = post_turn(
        &server,
        &eu_key,
        &conv,
        json!({"content": "x [[mock:status=500]]", "client_id": "f"}),
    )
    .await;
    expect_error(resp, 502, "upstream_error").await;
    assert_eq!(us.requests(), 0, "a request left its allowed region");
    assert_eq!(eu.requests(), 4);

    // A route restricted to eu-west ignores its us target for everyone.
    let (_, any) = server.create_key(json!({"tenant": "acme"})).await;
    let conv = create_conversation(&server, Some(&any), json!({"model": "eu-only"})).await;
    let resp = post_turn(
        &server,
        &any,
        &conv,
        json!({"content": "q", "client_id": "c"}),
    )
    .await;
    assert_eq!(resp.json::<Value>().await.unwrap()["provider"], "eu");
    assert_eq!(us.requests(), 0);

    // No allowed target at all: forbidden, before any upstream call.
    let (_, ap_key) = server
        .create_key(json!({"tenant": "acme", "regions": ["ap-south"]}))
        .await;
    let conv = create_conversation(&server, Some(&ap_key), json!({"model": "both"})).await;
    let resp = post_turn(
        &server,
        &ap_key,
        &conv,
        json!({"content": "q", "client_id": "c"}),
    )
    .await;
    expect_error(resp, 403, "forbidden").await;
    let resp = http()
        .post(server.url("/v1/chat/completions"))
        .bearer_auth(&ap_key)
        .json(&json!({"model": "both", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    expect_error(resp, 403, "forbidden").await;
    assert_eq!(us.requests() + eu.requests(), 5);
}

/// A small budget is usable: a key whose budget covers the prompt is served, with the reply's
/// `max_tokens` clamped to what is left (its first request used to be refused because the
/// reservation of prompt + 1024 exceeded the whole day); a prompt that does not fit is refused
/// before anything is sent.
#[tokio::test]
async fn a_small_daily_budget_serves_what_it_covers() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start_with_admin(config_with(Some(&up)));
    let (_, key) = server
        .create_key(json!({"tenant": "small", "daily_tokens": 1000}))
        .await;
    let ask = |content: String| {
        http()
            .post(server.url("/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&json!({"model": "up", "messages": [{"role": "user", "content": content}]}))
            .send()
    };
    let resp = ask("hello [[mock:words=5]]".into()).await.unwrap();
    assert_eq!(resp.status(), 200, "{:?}", resp.text().await);
    let sent = up.received().last().unwrap().clone();
    let max = sent["max_tokens"].as_u64().unwrap();
    assert!(max < 1000 && max > 900, "{sent}");
    // A prompt larger than what is left is refused, and reaches nobody.
    let before = up.requests();
    let resp = ask("word ".repeat(1200)).await.unwrap();
    expect_error(resp, 429, "quota_exceeded").await;
    assert_eq!(up.requests(), before);
}

/// A tenant keeps a bounded number of conversations: past the bound, creating one is
/// `quota_exceeded`; deleting one makes room again.
#[tokio::test]
async fn a_tenant_keeps_a_bounded_number_of_conversations() {
    let mut cfg = config_with(None);
    cfg.server.max_conversations_per_tenant = 2;
    let server = TestServer::start(cfg);
    let first = create_conversation(&server, None, json!({"model": "mock"})).await;
    create_conversation(&server, None, json!({"model": "mock"})).await;
    let create = || {
        http()
            .post(server.url("/v1/conversations"))
            .json(&json!({"model": "mock"}))
            .send()
    };
    expect_error(create().await.unwrap(), 429, "quota_exceeded").await;
    let mut ws = Ws::connect(&server, None).await;
    ws.send(json!({"type": "create", "client_id": "c", "model": "mock"}))
        .await;
    assert_eq!(ws.recv().await["code"], "quota_exceeded");
    let resp = http()
        .delete(server.url(&format!("/v1/conversations/{first}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(create().await.unwrap().status(), 201);
}
