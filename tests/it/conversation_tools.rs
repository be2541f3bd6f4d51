//! Tools in conversations (PROTOCOL §7): the tool loop over WebSocket and REST — calls in
//! `delta`s and `done`, `tool_result` frames acked and stored, the next turn by itself when
//! every call has its result, stray results refused, replay of calls and results, a crash
//! between a call and its result, and the same loop through an Anthropic target.

use serde_json::{json, Value};

use crate::common::*;
use parley::config::{ProviderConfig, ProviderKind};
use parley::mock_upstream::{Behaviour, MockUpstream};

const WEATHER: &str = r#"[{"type": "function", "function": {"name": "weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
  {"type": "function", "function": {"name": "time",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}}]"#;

fn tools() -> Value {
    serde_json::from_str(WEATHER).unwrap()
}

async fn create_with_tools(ws: &mut Ws, model: &str) -> String {
    ws.send(json!({"type": "create", "client_id": "c", "model": model, "tools": tools()}))
        .await;
    let f = ws.recv().await;
    assert_eq!(f["type"], "created", "{f}");
    f["conversation"].as_str().unwrap().to_owned()
}

/// The calls put together from `delta` fragments, by index.
fn calls_from_deltas(frames: &[Value]) -> Vec<(String, String, String)> {
    let mut calls: Vec<(String, String, String)> = Vec::new();
    for f in frames.iter().filter(|f| f["type"] == "delta") {
        for c in f["tool_calls"].as_array().into_iter().flatten() {
            let i = c["index"].as_u64().unwrap() as usize;
            if calls.len() <= i {
                calls.resize(i + 1, Default::default());
            }
            if let Some(id) = c["id"].as_str() {
                calls[i].0 = id.to_owned();
            }
            if let Some(name) = c["function"]["name"].as_str() {
                calls[i].1.push_str(name);
            }
            if let Some(args) = c["function"]["arguments"].as_str() {
                calls[i].2.push_str(args);
            }
        }
    }
    calls
}

#[tokio::test]
async fn tool_loop_over_websocket_seen_by_two_sockets() {
    let server = TestServer::start(config_with(None));
    let mut a = Ws::connect(&server, None).await;
    let mut b = Ws::connect(&server, None).await;
    let conv = create_with_tools(&mut a, "mock").await;
    b.send(json!({"type": "subscribe", "conversation": conv}))
        .await;
    assert_eq!(b.recv().await["type"], "subscribed");

    a.send(
        json!({"type": "user_message", "conversation": conv, "client_id": "u1",
                  "content": "Paris please [[mock:tools=2]]"}),
    )
    .await;
    let frames = a.recv_until(|f| is_end_of(f, "u1")).await;
    let seen_by_b = b.recv_until(|f| is_end_of(f, "u1")).await;
    assert_eq!(frames, seen_by_b, "both sockets see the same frames");
    assert_eq!(frames[0]["type"], "ack");
    assert_eq!(frames[0]["seq"], 1);
    let done = frames.last().unwrap();
    assert_eq!(done["type"], "done", "{done}");
    assert_eq!(done["finish_reason"], "tool_calls");
    assert_eq!(done["seq"], 2);
    let calls = done["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 2, "{done}");
    assert_eq!(calls[0]["function"]["name"], "weather");
    assert_eq!(calls[1]["function"]["name"], "time");
    let args: Value =
        serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"city": "Paris please"}));
    // The streamed fragments add up to the calls of `done`.
    let streamed = calls_from_deltas(&frames);
    assert_eq!(streamed.len(), 2);
    for (s, c) in streamed.iter().zip(calls) {
        assert_eq!(s.0, c["id"].as_str().unwrap());
        assert_eq!(s.1, c["function"]["name"].as_str().unwrap());
        assert_eq!(s.2, c["function"]["arguments"].as_str().unwrap());
    }
    let id0 = calls[0]["id"].as_str().unwrap().to_owned();
    let id1 = calls[1]["id"].as_str().unwrap().to_owned();

    // A user message while the calls wait for their results is refused.
    a.send(json!({"type": "user_message", "conversation": conv, "client_id": "u2", "content": "hello?"}))
        .await;
    let err = a.recv().await;
    assert_eq!(err["type"], "error");
    assert_eq!(err["code"], "bad_request");
    assert!(err["message"].as_str().unwrap().contains(&id0), "{err}");

    // A result for a call that is not open is refused and stores nothing.
    a.send(
        json!({"type": "tool_result", "conversation": conv, "client_id": "stray",
                  "tool_call_id": "call_nope", "content": "x"}),
    )
    .await;
    let err = a.recv().await;
    assert_eq!(
        (err["type"].as_str(), err["code"].as_str()),
        (Some("error"), Some("bad_request")),
        "{err}"
    );
    assert_eq!(err["client_id"], "stray");

    // The first result is acked and stored; nothing runs yet.
    a.send(
        json!({"type": "tool_result", "conversation": conv, "client_id": "r1",
                  "tool_call_id": id0, "content": "18C and sunny"}),
    )
    .await;
    let ack = a.recv().await;
    assert_eq!(
        (ack["type"].as_str(), ack["seq"].as_u64()),
        (Some("ack"), Some(3)),
        "{ack}"
    );
    assert_eq!(b.recv().await, ack);
    // The same call answered twice is not an open call any more.
    a.send(
        json!({"type": "tool_result", "conversation": conv, "client_id": "r1-again",
                  "tool_call_id": id0, "content": "again"}),
    )
    .await;
    assert_eq!(a.recv().await["code"], "bad_request");

    // The last result completes the set: the next turn runs by itself.
    a.send(
        json!({"type": "tool_result", "conversation": conv, "client_id": "r2",
                  "tool_call_id": id1, "content": "no clock", "is_error": true}),
    )
    .await;
    let frames = a.recv_until(|f| is_end_of(f, "r2")).await;
    assert_eq!(frames[0]["type"], "ack");
    assert_eq!(frames[0]["seq"], 4);
    let done = frames.last().unwrap();
    assert_eq!(done["type"], "done", "{done}");
    assert_eq!(done["reply_to"], 4);
    assert_eq!(done["seq"], 5);
    assert_eq!(done["finish_reason"], "stop");
    assert!(done.get("tool_calls").is_none(), "{done}");
    assert_eq!(
        delta_text(&frames),
        "Tool results: 18C and sunny; error: no clock."
    );
    b.recv_until(|f| is_end_of(f, "r2")).await;

    // Stored as they were, and replayed as they were.
    let stored = messages(&server, None, &conv).await;
    let roles: Vec<&str> = stored.iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["user", "assistant", "tool", "tool", "assistant"]);
    assert_eq!(stored[1]["tool_calls"].as_array().unwrap().len(), 2);
    assert_eq!(stored[1]["finish_reason"], "tool_calls");
    assert_eq!(stored[2]["tool_call_id"], id0.as_str());
    assert_eq!(stored[3]["is_error"], true);
    let mut c = Ws::connect(&server, None).await;
    c.send(json!({"type": "subscribe", "conversation": conv, "after_seq": 0}))
        .await;
    assert_eq!(c.recv().await["type"], "subscribed");
    for m in &stored {
        let f = c.recv().await;
        assert_eq!(f["type"], "message");
        for k in [
            "seq",
            "role",
            "content",
            "tool_calls",
            "tool_call_id",
            "is_error",
        ] {
            assert_eq!(f.get(k), m.get(k), "{k}: {f} vs {m}");
        }
    }
    // After the loop, plain turns go on.
    let frames = a.turn(&conv, "u3", "thanks").await;
    assert_eq!(frames.last().unwrap()["type"], "done");
}

#[tokio::test]
async fn image_parts_are_stored_and_replayed_as_sent() {
    let server = TestServer::start(config_with(None));
    let mut ws = Ws::connect(&server, None).await;
    let conv = ws.create("mock").await;
    let parts = json!([{"type": "text", "text": "what is this?"},
                       {"type": "image_url", "image_url": {"url": "https://example.com/cat.png", "detail": "low"}}]);
    ws.send(
        json!({"type": "user_message", "conversation": conv, "client_id": "img", "content": parts}),
    )
    .await;
    let frames = ws.recv_until(|f| is_end_of(f, "img")).await;
    let done = frames.last().unwrap();
    assert_eq!(done["type"], "done", "{done}");
    assert!(
        delta_text(&frames).starts_with("I see 1 image"),
        "{frames:?}"
    );
    let stored = messages(&server, None, &conv).await;
    assert_eq!(stored[0]["content"], parts);
    // Images count in the budget: with 300 prompt tokens, a low-detail image (85) fits and
    // one of unknown size at high detail (up to 1445) does not.
    let mut cfg = config_with(None);
    cfg.context.budget_tokens = 300;
    cfg.context.reserve_output_tokens = 0;
    let small = TestServer::start(cfg);
    let mut ws2 = Ws::connect(&small, None).await;
    let conv2 = ws2.create("mock").await;
    ws2.send(json!({"type": "user_message", "conversation": conv2, "client_id": "low", "content": parts}))
        .await;
    let frames = ws2.recv_until(|f| is_end_of(f, "low")).await;
    assert_eq!(frames.last().unwrap()["type"], "done", "{frames:?}");
    let high = json!([{"type": "text", "text": "and this?"},
                      {"type": "image_url", "image_url": {"url": "https://example.com/dog.png"}}]);
    ws2.send(json!({"type": "user_message", "conversation": conv2, "client_id": "high", "content": high}))
        .await;
    let err = ws2.recv().await;
    assert_eq!(err["code"], "too_large", "{err}");
    assert_eq!(messages(&small, None, &conv2).await.len(), 2);

    // A malformed part is refused before anything is stored.
    ws.send(
        json!({"type": "user_message", "conversation": conv, "client_id": "bad",
                   "content": [{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}]}),
    )
    .await;
    let err = ws.recv().await;
    assert_eq!(err["code"], "bad_request", "{err}");
    assert!(
        err["message"].as_str().unwrap().contains("content[0]"),
        "{err}"
    );
    assert_eq!(messages(&server, None, &conv).await.len(), 2);
}

#[tokio::test]
async fn rest_tool_loop_through_an_anthropic_target() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let mut cfg = config_with(None);
    let env = unique_env("PARLEY_IT_ANTH_KEY");
    std::env::set_var(&env, "sk-ant-test");
    cfg.providers.push(ProviderConfig {
        kind: ProviderKind::Anthropic,
        api_key_env: Some(env),
        ..openai_provider("anth", &up.base_url())
    });
    cfg.routes.push(route("claude", &[("anth", "claude-test")]));
    let server = TestServer::start(cfg);
    let conv = create_conversation(
        &server,
        None,
        json!({"model": "claude", "tools": tools(), "tool_choice": "required"}),
    )
    .await;
    let post = |body: Value| {
        http()
            .post(server.url(&format!("/v1/conversations/{conv}/messages")))
            .json(&body)
            .send()
    };
    let resp = post(json!({"content": "Oslo"})).await.unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    let calls = v["message"]["tool_calls"].as_array().unwrap().clone();
    assert_eq!(calls.len(), 1, "{v}");
    assert_eq!(v["message"]["finish_reason"], "tool_calls");
    let id = calls[0]["id"].as_str().unwrap();
    assert!(id.starts_with("toolu_"), "{id}");
    let sent = up.received().last().unwrap().clone();
    assert_eq!(sent["tool_choice"]["type"], "any", "{sent}");
    assert_eq!(sent["tools"][0]["input_schema"]["type"], "object", "{sent}");

    // A stray result is a bad request; the right one runs the next turn.
    let resp = post(json!({"role": "tool", "tool_call_id": "toolu_nope", "content": "x"}))
        .await
        .unwrap();
    expect_error(resp, 400, "bad_request").await;
    let resp = post(json!({"role": "tool", "tool_call_id": id, "content": "-3C"}))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    // tool_choice "required" would call again; the mock answers results with text.
    assert_eq!(v["message"]["content"], "Tool results: -3C.", "{v}");
    let sent = up.received().last().unwrap().clone();
    let msgs = sent["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 3, "{sent}");
    assert_eq!(msgs[1]["content"][0]["type"], "tool_use");
    assert_eq!(msgs[2]["role"], "user");
    assert_eq!(msgs[2]["content"][0]["type"], "tool_result");
    assert_eq!(msgs[2]["content"][0]["tool_use_id"], id);
}

#[tokio::test]
async fn kill_9_between_a_call_and_its_result_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut bin = BinServer::start(MOCK_ONLY, tmp.path(), &[]);
    let client = http();
    let created: Value = client
        .post(bin.url("/v1/conversations"))
        .json(&json!({"model": "mock", "tools": tools()}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let conv = created["id"].as_str().unwrap().to_owned();
    let url = bin.url(&format!("/v1/conversations/{conv}/messages"));
    let v: Value = client
        .post(&url)
        .json(&json!({"content": "Rome [[mock:tool=weather]]", "client_id": "q"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = v["message"]["tool_calls"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    bin.kill9();

    let mut bin = BinServer::start(MOCK_ONLY, tmp.path(), &[]);
    let url = bin.url(&format!("/v1/conversations/{conv}/messages"));
    let stored: Value = client.get(&url).send().await.unwrap().json().await.unwrap();
    let stored = stored["data"].as_array().unwrap();
    assert_eq!(stored.len(), 2);
    assert_eq!(stored[1]["tool_calls"][0]["id"], id.as_str());
    // The call is still open after the crash: its result is taken and answered.
    let resp = client
        .post(&url)
        .json(&json!({"role": "tool", "tool_call_id": id, "content": "25C", "client_id": "r"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["message"]["content"], "Tool results: 25C.");
    assert_eq!(v["message"]["seq"], 4);
    bin.terminate();
}
