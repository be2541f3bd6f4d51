//! The REST conversation API and the health endpoints (PROTOCOL §4): create, read, page,
//! post a turn (JSON and SSE), idempotency, fan-out to sockets, delete, and the error shape.

use crate::common::*;
use serde_json::{json, Value};

/// Posts `body` to a conversation's messages (development mode, no key).
async fn post_message(server: &TestServer, conv: &str, body: Value) -> reqwest::Response {
    http()
        .post(server.url(&format!("/v1/conversations/{conv}/messages")))
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn get_json(server: &TestServer, path: &str) -> (u16, Value) {
    let resp = http().get(server.url(path)).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

fn seqs(page: &Value) -> Vec<u64> {
    page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect()
}

#[tokio::test]
async fn create_and_get_conversation() {
    let server = TestServer::start(config_with(None));
    let resp = http()
        .post(server.url("/v1/conversations"))
        .json(&json!({"model": "mock", "system": "be brief", "metadata": {"user": "u1", "n": 3}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let created: Value = resp.json().await.unwrap();
    let id = created["id"].as_str().unwrap();
    assert!(id.starts_with("conv_"), "{created}");
    assert_eq!(created["model"], "mock");
    assert_eq!(created["metadata"], json!({"user": "u1", "n": 3}));
    assert_eq!(created["last_seq"], 0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let created_at = created["created_at"].as_i64().unwrap();
    assert!(
        (now - created_at).abs() < 60,
        "created_at {created_at} vs now {now}"
    );

    let (status, got) = get_json(&server, &format!("/v1/conversations/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(got, created);

    // Without a model the conversation uses the route `default`; without metadata it is `{}`.
    let resp = http()
        .post(server.url("/v1/conversations"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["model"], "default");
    assert_eq!(v["metadata"], json!({}));
    assert_ne!(v["id"], created["id"]);
}

#[tokio::test]
async fn post_message_answers_the_stored_reply() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start(config_with(Some(&up)));
    let conv = create_conversation(&server, None, json!({"model": "up"})).await;
    let resp = post_message(
        &server,
        &conv,
        json!({"content": "hello over rest", "client_id": "r1"}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    let plan = mock_plan(0, &[("user", "hello over rest")]);

    let msg = &v["message"];
    assert_eq!(msg["seq"], 2, "{v}");
    assert_eq!(msg["role"], "assistant");
    assert_eq!(msg["content"], plan.text().as_str());
    assert_eq!(msg["finish_reason"], "stop");
    assert!(msg["created_at"].is_i64());
    assert_eq!(v["usage"]["prompt_tokens"], plan.prompt_tokens);
    assert_eq!(v["usage"]["completion_tokens"], plan.completion_tokens);
    assert_eq!(
        v["usage"]["total_tokens"],
        plan.prompt_tokens + plan.completion_tokens
    );
    assert_eq!(v["cached"], false);
    assert_eq!(v["provider"], "up");
    assert_eq!(v["model"], "mock-1");

    let stored = messages(&server, None, &conv).await;
    assert_eq!(stored.len(), 2);
    assert_eq!(stored[0]["seq"], 1);
    assert_eq!(stored[0]["role"], "user");
    assert_eq!(stored[0]["content"], "hello over rest");
    assert_eq!(stored[0]["client_id"], "r1");
    assert_eq!(&stored[1], msg);

    let (_, got) = get_json(&server, &format!("/v1/conversations/{conv}")).await;
    assert_eq!(got["last_seq"], 2);
    assert_eq!(up.requests(), 1);
}

#[tokio::test]
async fn messages_page_by_after_seq_and_limit() {
    let server = TestServer::start(config_with(None));
    let conv = create_conversation(&server, None, json!({"model": "mock"})).await;
    for (i, text) in ["first [[mock:words=3]]", "second [[mock:words=4]]"]
        .into_iter()
        .enumerate()
    {
        let resp = post_message(
            &server,
            &conv,
            json!({"content": text, "client_id": format!("p{i}")}),
        )
        .await;
        assert_eq!(resp.status(), 200);
    }
    let base = format!("/v1/conversations/{conv}/messages");
    let (status, all) = get_json(&server, &base).await;
    assert_eq!(status, 200);
    assert_eq!(seqs(&all), [1, 2, 3, 4]);
    let roles: Vec<_> = all["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["user", "assistant", "user", "assistant"]);
    assert_eq!(all["data"][2]["content"], "second [[mock:words=4]]");
    assert_eq!(
        all["data"][3]["content"]
            .as_str()
            .unwrap()
            .split(' ')
            .count(),
        4
    );

    assert_eq!(
        seqs(&get_json(&server, &format!("{base}?limit=2")).await.1),
        [1, 2]
    );
    assert_eq!(
        seqs(
            &get_json(&server, &format!("{base}?after_seq=1&limit=2"))
                .await
                .1
        ),
        [2, 3]
    );
    assert_eq!(
        seqs(&get_json(&server, &format!("{base}?after_seq=2")).await.1),
        [3, 4]
    );
    assert_eq!(
        seqs(
            &get_json(&server, &format!("{base}?after_seq=3&limit=1"))
                .await
                .1
        ),
        [4]
    );
    assert_eq!(
        seqs(&get_json(&server, &format!("{base}?after_seq=4")).await.1),
        Vec::<u64>::new()
    );

    // Paging through with limit 1 gives every message exactly once, in order.
    let (mut after, mut seen) = (0, Vec::new());
    loop {
        let page = get_json(&server, &format!("{base}?after_seq={after}&limit=1"))
            .await
            .1;
        let Some(m) = page["data"].as_array().unwrap().first() else {
            break;
        };
        after = m["seq"].as_u64().unwrap();
        seen.push(m.clone());
    }
    assert_eq!(seen, all["data"].as_array().unwrap().clone());

    let resp = http()
        .get(server.url(&format!("{base}?after_seq=abc")))
        .send()
        .await
        .unwrap();
    expect_error(resp, 400, "bad_request").await;
}

#[tokio::test]
async fn streamed_post_sends_ack_deltas_done_as_sse() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start(config_with(Some(&up)));
    let conv = create_conversation(&server, None, json!({"model": "up"})).await;
    let resp = post_message(
        &server,
        &conv,
        json!({"content": "stream it please", "client_id": "s1", "stream": true}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let events = sse_events(&resp.text().await.unwrap());
    let frames: Vec<Value> = events
        .iter()
        .map(|e| {
            let f: Value = serde_json::from_str(&e.data).unwrap();
            // Each event is named after the type of the WebSocket frame it carries.
            assert_eq!(e.event.as_deref(), f["type"].as_str(), "{e:?}");
            f
        })
        .collect();
    assert!(frames.len() >= 3, "{frames:?}");
    let ack = &frames[0];
    assert_eq!(
        ack,
        &json!({"type": "ack", "conversation": conv, "client_id": "s1", "seq": 1})
    );
    let deltas = &frames[1..frames.len() - 1];
    assert!(!deltas.is_empty());
    for d in deltas {
        assert_eq!(d["type"], "delta", "{d}");
        assert_eq!(d["conversation"], conv.as_str());
        assert_eq!(d["reply_to"], 1);
    }
    let done = frames.last().unwrap();
    assert_eq!(done["type"], "done", "{done}");
    assert_eq!(done["conversation"], conv.as_str());
    assert_eq!(done["reply_to"], 1);
    assert_eq!(done["seq"], 2);
    assert_eq!(done["finish_reason"], "stop");
    assert_eq!(done["provider"], "up");
    assert_eq!(done["model"], "mock-1");
    assert_eq!(done["cached"], false);

    let text = delta_text(&frames);
    assert_eq!(text, mock_reply(0, &[("user", "stream it please")]));
    let stored = messages(&server, None, &conv).await;
    assert_eq!(stored.len(), 2);
    assert_eq!(stored[1]["content"], text.as_str());
    assert_eq!(stored[1]["finish_reason"], "stop");
}

#[tokio::test]
async fn client_id_makes_a_rest_post_idempotent() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start(config_with(Some(&up)));
    let conv = create_conversation(&server, None, json!({"model": "up"})).await;
    let body = json!({"content": "only once", "client_id": "same-id"});
    let first: Value = post_message(&server, &conv, body.clone())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(first["message"]["seq"], 2, "{first}");
    let resp = post_message(&server, &conv, body.clone()).await;
    assert_eq!(resp.status(), 200);
    let second: Value = resp.json().await.unwrap();
    assert_eq!(second, first);
    assert_eq!(messages(&server, None, &conv).await.len(), 2);
    assert_eq!(up.requests(), 1);

    // Streamed, the duplicate answers the original ack and done, and still stores nothing.
    let resp = post_message(
        &server,
        &conv,
        json!({"content": "only once", "client_id": "same-id", "stream": true}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let frames: Vec<Value> = sse_events(&resp.text().await.unwrap())
        .iter()
        .map(|e| serde_json::from_str(&e.data).unwrap())
        .collect();
    assert_eq!(
        frames[0],
        json!({"type": "ack", "conversation": conv, "client_id": "same-id", "seq": 1})
    );
    let done = frames.last().unwrap();
    assert_eq!(done["type"], "done", "{frames:?}");
    assert_eq!(done["seq"], 2);
    assert_eq!(done["usage"], first["usage"]);
    assert_eq!(messages(&server, None, &conv).await.len(), 2);
    assert_eq!(up.requests(), 1);
}

#[tokio::test]
async fn a_rest_turn_reaches_subscribed_websockets() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start(config_with(Some(&up)));
    let conv = create_conversation(&server, None, json!({"model": "up"})).await;
    let mut ws = Ws::connect(&server, None).await;
    ws.send(json!({"type": "subscribe", "conversation": conv}))
        .await;
    assert_eq!(
        ws.recv().await,
        json!({"type": "subscribed", "conversation": conv, "last_seq": 0})
    );

    let resp = post_message(
        &server,
        &conv,
        json!({"content": "seen everywhere", "client_id": "rest-1"}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let reply: Value = resp.json().await.unwrap();

    let frames = ws.recv_until(|f| is_end_of(f, "rest-1")).await;
    assert_eq!(
        frames[0],
        json!({"type": "ack", "conversation": conv, "client_id": "rest-1", "seq": 1})
    );
    let done = frames.last().unwrap();
    assert_eq!(done["type"], "done", "{frames:?}");
    assert_eq!(done["seq"], 2);
    assert_eq!(done["usage"], reply["usage"]);
    assert_eq!(
        delta_text(&frames),
        reply["message"]["content"].as_str().unwrap()
    );
}

#[tokio::test]
async fn delete_removes_the_conversation() {
    let server = TestServer::start(config_with(None));
    let conv = create_conversation(&server, None, json!({"model": "mock"})).await;
    let resp = post_message(
        &server,
        &conv,
        json!({"content": "to be forgotten [[mock:words=3]]"}),
    )
    .await;
    assert_eq!(resp.status(), 200);

    let resp = http()
        .delete(server.url(&format!("/v1/conversations/{conv}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert!(resp.bytes().await.unwrap().is_empty());

    let not_found = error_body("not_found", "conversation not found");
    let resp = http()
        .get(server.url(&format!("/v1/conversations/{conv}")))
        .send()
        .await
        .unwrap();
    assert_eq!(expect_error(resp, 404, "not_found").await, not_found);
    let resp = http()
        .get(server.url(&format!("/v1/conversations/{conv}/messages")))
        .send()
        .await
        .unwrap();
    assert_eq!(expect_error(resp, 404, "not_found").await, not_found);
    let resp = post_message(&server, &conv, json!({"content": "anyone?"})).await;
    assert_eq!(expect_error(resp, 404, "not_found").await, not_found);
    let resp = http()
        .delete(server.url(&format!("/v1/conversations/{conv}")))
        .send()
        .await
        .unwrap();
    assert_eq!(expect_error(resp, 404, "not_found").await, not_found);
    // A malformed id names no conversation either.
    let resp = http()
        .get(server.url("/v1/conversations/not-an-id"))
        .send()
        .await
        .unwrap();
    assert_eq!(expect_error(resp, 404, "not_found").await, not_found);
}

/// Found by the fuzz driver: the actor shut down for the delete was restarted by its
/// supervisor, took the running turn's message for an interrupted one and stored a reply for
/// it, so the turn's own reply met a seq conflict and its caller got `internal` (500).
#[tokio::test]
async fn deleting_a_conversation_mid_turn_answers_the_turn_without_internal() {
    let server = TestServer::start(config_with(None));
    for stream in [false, true] {
        let conv = create_conversation(&server, None, json!({"model": "mock"})).await;
        let body = json!({"content": "slow [[mock:ttft_ms=5000]]", "stream": stream});
        let url = server.url(&format!("/v1/conversations/{conv}/messages"));
        let turn = tokio::spawn(async move {
            let resp = http().post(url).json(&body).send().await.unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        });
        // The turn is running once its user message is stored.
        let end = std::time::Instant::now() + TIMEOUT;
        while messages(&server, None, &conv).await.is_empty() {
            assert!(std::time::Instant::now() < end, "the turn never started");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let resp = http()
            .delete(server.url(&format!("/v1/conversations/{conv}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 204);
        let (status, text) = tokio::time::timeout(TIMEOUT, turn).await.unwrap().unwrap();
        assert!(
            !text.contains("internal") && status != 500,
            "{status} {text}"
        );
        let resp = http()
            .get(server.url(&format!("/v1/conversations/{conv}/messages")))
            .send()
            .await
            .unwrap();
        expect_error(resp, 404, "not_found").await;
    }
}

#[tokio::test]
async fn unknown_model_is_model_not_found() {
    let server = TestServer::start(config_with(None));
    let resp = http()
        .post(server.url("/v1/conversations"))
        .json(&json!({"model": "nope"}))
        .send()
        .await
        .unwrap();
    let body = expect_error(resp, 404, "model_not_found").await;
    assert_eq!(
        body,
        error_body("model_not_found", "model \"nope\" does not exist")
    );

    // A per-turn model override that does not exist, too.
    let conv = create_conversation(&server, None, json!({"model": "mock"})).await;
    let resp = post_message(
        &server,
        &conv,
        json!({"content": "hi", "options": {"model": "nope"}}),
    )
    .await;
    expect_error(resp, 404, "model_not_found").await;
    assert!(messages(&server, None, &conv).await.is_empty());
}

#[tokio::test]
async fn bad_bodies_are_bad_requests() {
    let server = TestServer::start(config_with(None));
    let url = server.url("/v1/conversations");
    let resp = http()
        .post(&url)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    expect_error(resp, 400, "bad_request").await;
    let resp = http()
        .post(&url)
        .header("content-type", "application/json")
        .body("")
        .send()
        .await
        .unwrap();
    expect_error(resp, 400, "bad_request").await;
    let resp = http()
        .post(&url)
        .json(&json!({"model": "mock", "bogus": 1}))
        .send()
        .await
        .unwrap();
    let body = expect_error(resp, 400, "bad_request").await;
    assert!(
        body["error"]["message"].as_str().unwrap().contains("bogus"),
        "{body}"
    );
    let resp = http()
        .post(&url)
        .json(&json!({"model": 7}))
        .send()
        .await
        .unwrap();
    expect_error(resp, 400, "bad_request").await;

    let conv = create_conversation(&server, None, json!({"model": "mock"})).await;
    let murl = server.url(&format!("/v1/conversations/{conv}/messages"));
    let resp = http()
        .post(&murl)
        .header("content-type", "application/json")
        .body("[1,")
        .send()
        .await
        .unwrap();
    expect_error(resp, 400, "bad_request").await;
    let resp = http()
        .post(&murl)
        .json(&json!({"client_id": "x"}))
        .send()
        .await
        .unwrap();
    expect_error(resp, 400, "bad_request").await;
    let resp = http()
        .post(&murl)
        .json(&json!({"content": "hi", "extra": true}))
        .send()
        .await
        .unwrap();
    let body = expect_error(resp, 400, "bad_request").await;
    assert!(
        body["error"]["message"].as_str().unwrap().contains("extra"),
        "{body}"
    );
    let resp = http()
        .post(&murl)
        .json(&json!({"content": "hi", "options": {"bogus_option": 1}}))
        .send()
        .await
        .unwrap();
    expect_error(resp, 400, "bad_request").await;
    // Nothing was stored by any of them.
    assert!(messages(&server, None, &conv).await.is_empty());
}

#[tokio::test]
async fn unknown_path_is_404_in_openai_shape() {
    let server = TestServer::start(config_with(None));
    let resp = http().get(server.url("/v1/nope")).send().await.unwrap();
    assert_eq!(
        expect_error(resp, 404, "not_found").await,
        error_body("not_found", "GET /v1/nope not found")
    );
    let resp = http()
        .post(server.url("/elsewhere"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    expect_error(resp, 404, "not_found").await;
}

#[tokio::test]
async fn upstream_failure_on_a_rest_turn_is_502() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start(config_with(Some(&up)));
    let conv = create_conversation(&server, None, json!({"model": "up"})).await;
    let resp = post_message(
        &server,
        &conv,
        json!({"content": "boom [[mock:status=500]]", "client_id": "f1"}),
    )
    .await;
    expect_error(resp, 502, "upstream_error").await;
    // The acked user message is kept.
    let stored = messages(&server, None, &conv).await;
    assert_eq!(stored[0]["content"], "boom [[mock:status=500]]");
    assert_eq!(stored[0]["seq"], 1);
    // Resending it answers the same failure, without a second upstream call.
    let resp = post_message(
        &server,
        &conv,
        json!({"content": "boom [[mock:status=500]]", "client_id": "f1"}),
    )
    .await;
    expect_error(resp, 502, "upstream_error").await;
    assert_eq!(up.requests(), 1);

    // Streamed, the failure is the last event, the JSON of the WebSocket error frame.
    let resp = post_message(
        &server,
        &conv,
        json!({"content": "again [[mock:status=503]]", "client_id": "f2", "stream": true}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let events = sse_events(&resp.text().await.unwrap());
    assert_eq!(events[0].event.as_deref(), Some("ack"), "{events:?}");
    let last = events.last().unwrap();
    assert_eq!(last.event.as_deref(), Some("error"), "{events:?}");
    let err: Value = serde_json::from_str(&last.data).unwrap();
    assert_eq!(err["type"], "error");
    assert_eq!(err["code"], "upstream_error");
    assert_eq!(err["conversation"], conv.as_str());
    assert_eq!(err["client_id"], "f2");

    // The conversation is not wedged: the next turn works.
    let resp = post_message(
        &server,
        &conv,
        json!({"content": "fine now", "client_id": "f3"}),
    )
    .await;
    assert_eq!(resp.status(), 200, "{:?}", resp.text().await);
}

#[tokio::test]
async fn health_ready_and_metrics() {
    let server = TestServer::start(config_with(None));
    let resp = http().get(server.url("/healthz")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let resp = http().get(server.url("/readyz")).send().await.unwrap();
    assert_eq!(resp.status(), 200);

    let conv = create_conversation(&server, None, json!({"model": "mock"})).await;
    let resp = post_message(
        &server,
        &conv,
        json!({"content": "count me [[mock:words=3]]"}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let resp = http().get(server.url("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = resp.text().await.unwrap();
    let turns: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("parley_turns_total{"))
        .collect();
    assert!(!turns.is_empty(), "{text}");
    assert!(
        turns
            .iter()
            .any(|l| l.contains("provider=\"mock\"") && !l.ends_with(" 0")),
        "{turns:?}"
    );
}

/// The built-in mock honours its provider's `timeout_secs` like any provider: a `hang`
/// directive ends in a timeout, not a request held for ever.
#[tokio::test]
async fn the_builtin_mock_times_out_a_hung_reply() {
    let mut cfg = config_with(None);
    for p in cfg.providers.iter_mut().filter(|p| p.name == "mock") {
        p.timeout_secs = 1;
    }
    let server = TestServer::start(cfg);
    let resp = http()
        .post(server.url("/v1/chat/completions"))
        .json(&json!({"model": "mock", "messages": [{"role": "user", "content": "[[mock:hang]]"}]}))
        .timeout(std::time::Duration::from_secs(20))
        .send()
        .await
        .unwrap();
    expect_error(resp, 504, "upstream_unavailable").await;
}

/// A method a path does not serve is 405 in the error shape, not 404; an unknown path is 404.
#[tokio::test]
async fn wrong_methods_are_405_and_unknown_paths_404() {
    let server = TestServer::start(config_with(None));
    let resp = http()
        .get(server.url("/v1/chat/completions"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["error"]["message"].as_str().unwrap().contains("GET"),
        "{body}"
    );
    let resp = http()
        .put(server.url("/v1/conversations"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    let resp = http().get(server.url("/v1/nothing")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
}

/// A user message that carries a tool result's fields is refused, not stored as a plain message
/// with the fields ignored.
#[tokio::test]
async fn tool_result_fields_on_a_user_message_are_refused() {
    let server = TestServer::start(config_with(None));
    let conv = create_conversation(&server, None, json!({"model": "mock"})).await;
    for body in [
        json!({"content": "hi", "tool_call_id": "call_1"}),
        json!({"content": "hi", "role": "user", "is_error": true}),
    ] {
        let resp = http()
            .post(server.url(&format!("/v1/conversations/{conv}/messages")))
            .json(&body)
            .send()
            .await
            .unwrap();
        expect_error(resp, 400, "bad_request").await;
    }
    assert!(messages(&server, None, &conv).await.is_empty());
}

/// Log volume does not follow abusive traffic: requests refused as the client's fault (4xx)
/// log nothing above debug, and a failed request logs one ERROR line (besides the router's
/// warnings about each upstream attempt, which speak of the upstream's health).
#[tokio::test]
async fn client_errors_log_nothing_and_a_server_error_logs_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = BinServer::start(MOCK_ONLY, tmp.path(), &[]);
    let c = http();
    let noisy = |log: &[String]| {
        log.iter()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .cloned()
            .collect::<Vec<_>>()
    };
    let before = noisy(&bin.log.lock().unwrap()).len();
    for i in 0..50 {
        let url = bin.url("/v1/chat/completions");
        let statuses = [
            c.post(&url)
                .header("content-type", "application/json")
                .body("{not json")
                .send()
                .await,
            c.post(&url)
                .json(&json!({"model": "nope", "messages": []}))
                .send()
                .await,
            c.post(&url)
                .json(&json!({"model": "mock", "messages": 3}))
                .send()
                .await,
            c.get(&url).send().await,
            c.get(bin.url(&format!("/v1/no/such/path/{i}")))
                .send()
                .await,
        ];
        for s in statuses {
            assert!(s.unwrap().status().is_client_error());
        }
    }
    // One request the upstream fails: a 5xx, logged once.
    let r = c
        .post(bin.url("/v1/chat/completions"))
        .json(&json!({"model": "mock", "messages": [{"role": "user", "content": "x [[mock:status=500]]"}]}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_server_error(), "{}", r.status());
    let deadline = std::time::Instant::now() + TIMEOUT;
    let lines = loop {
        let lines = noisy(&bin.log.lock().unwrap());
        if lines.iter().any(|l| l.contains(" ERROR ")) || std::time::Instant::now() > deadline {
            break lines;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let new = &lines[before..];
    let errors: Vec<_> = new.iter().filter(|l| l.contains(" ERROR ")).collect();
    assert_eq!(errors.len(), 1, "{new:#?}");
    assert!(errors[0].contains("upstream_error"), "{new:#?}");
    assert!(
        new.iter()
            .all(|l| l.contains(" ERROR ") || l.contains("parley::provider::router")),
        "{new:#?}"
    );
}

#[tokio::test]
async fn conversations_are_listed_newest_first_in_pages_per_tenant() {
    let server = TestServer::start_with_admin(config_with(None));
    let (_, a) = server.create_key(json!({"tenant": "a"})).await;
    let (_, b) = server.create_key(json!({"tenant": "b"})).await;
    let mut made = Vec::new();
    for i in 0..5 {
        made.push(
            create_conversation(
                &server,
                Some(&a),
                json!({"model": "mock", "metadata": {"title": format!("c{i}")}}),
            )
            .await,
        );
    }
    let theirs = create_conversation(&server, Some(&b), json!({"model": "mock"})).await;
    let page = |after: Option<String>| {
        let server = &server;
        let a = a.clone();
        async move {
            let path = match after {
                Some(id) => format!("/v1/conversations?limit=2&after={id}"),
                None => "/v1/conversations?limit=2".to_owned(),
            };
            get_json_as(server, &path, Some(&a)).await
        }
    };
    let mut listed = Vec::new();
    let mut after = None;
    loop {
        let v = page(after).await;
        assert_eq!(v["object"], "list");
        let ids: Vec<String> = v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["id"].as_str().unwrap().to_owned())
            .collect();
        assert!(ids.len() <= 2);
        listed.extend(ids);
        if v["has_more"] != true {
            break;
        }
        after = Some(v["last_id"].as_str().unwrap().to_owned());
    }
    // Every one of the tenant's, once, none of the other's; newest first (ids of one second
    // are in any order, so compare as sets and check the times descend).
    let mut sorted_listed = listed.clone();
    sorted_listed.sort();
    let mut sorted_made = made.clone();
    sorted_made.sort();
    assert_eq!(sorted_listed, sorted_made);
    assert!(!listed.contains(&theirs));
    let all = get_json_as(&server, "/v1/conversations?limit=100", Some(&a)).await;
    let times: Vec<i64> = all["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["created_at"].as_i64().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "{times:?}");
    // A deleted one leaves the list; another tenant's cursor is not found.
    let resp = with_key(
        http().delete(server.url(&format!("/v1/conversations/{}", made[0]))),
        Some(&a),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(resp.status(), 204);
    let all = get_json_as(&server, "/v1/conversations?limit=100", Some(&a)).await;
    assert_eq!(all["data"].as_array().unwrap().len(), 4);
    let resp = with_key(
        http().get(server.url(&format!("/v1/conversations?after={theirs}"))),
        Some(&a),
    )
    .send()
    .await
    .unwrap();
    expect_error(resp, 404, "not_found").await;
}
