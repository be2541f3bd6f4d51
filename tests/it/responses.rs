//! The Responses API on top of conversations (PROTOCOL §8), against an OpenAI-compatible route
//! (`up`) and an Anthropic route (`claude`) on one real mock upstream: chains that send the
//! server's history upstream, typed stream events in order, a function-call round trip,
//! `GET`/`DELETE`/`input_items`, tenants, `store: false`, idempotent retries, and the official
//! Python SDK doing the same.

use serde_json::{json, Value};

use crate::common::*;
use parley::config::{Config, ProviderConfig, ProviderKind};

const MODELS: [&str; 2] = ["up", "claude"];

fn both_routes(up: &MockUpstream) -> Config {
    let mut cfg = config_with(Some(up));
    let env = unique_env("PARLEY_IT_RESP_ANTH");
    std::env::set_var(&env, "sk-ant-it-resp");
    cfg.providers.push(ProviderConfig {
        kind: ProviderKind::Anthropic,
        api_key_env: Some(env),
        ..openai_provider("anth", &up.base_url())
    });
    cfg.routes.push(route("claude", &[("anth", "claude-test")]));
    cfg
}

async fn create(server: &TestServer, key: Option<&str>, body: Value) -> reqwest::Response {
    with_key(http().post(server.url("/v1/responses")), key)
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn create_ok(server: &TestServer, body: Value) -> Value {
    let resp = create(server, None, body.clone()).await;
    let status = resp.status();
    let text = resp.text().await.unwrap();
    assert_eq!(status, 200, "{body}\n→ {text}");
    serde_json::from_str(&text).unwrap()
}

/// The concatenated `output_text` of a Response object, as the SDKs compute it.
fn output_text(r: &Value) -> String {
    r["output"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["type"] == "message")
        .flat_map(|i| i["content"].as_array().unwrap().iter())
        .filter(|c| c["type"] == "output_text")
        .map(|c| c["text"].as_str().unwrap())
        .collect()
}

/// The user and assistant texts of an upstream request body, either wire format.
fn sent_texts(body: &Value) -> Vec<(String, String)> {
    body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let text = match &m["content"] {
                Value::String(s) => s.clone(),
                Value::Array(parts) => parts.iter().filter_map(|p| p["text"].as_str()).collect(),
                _ => String::new(),
            };
            (m["role"].as_str().unwrap().to_owned(), text)
        })
        .collect()
}

#[tokio::test]
async fn a_three_turn_chain_sends_the_servers_history() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start(both_routes(&up));
    for model in MODELS {
        let r1 = create_ok(
            &server,
            json!({"model": model, "input": "one", "instructions": "be brief"}),
        )
        .await;
        assert!(r1["id"].as_str().unwrap().starts_with("resp_"), "{r1}");
        assert_eq!(r1["object"], "response");
        assert_eq!(r1["status"], "completed");
        assert_eq!(r1["instructions"], "be brief");
        assert!(r1["usage"]["input_tokens"].as_u64().unwrap() > 0, "{r1}");
        let t1 = output_text(&r1);
        assert!(!t1.is_empty());
        let r2 = create_ok(
            &server,
            json!({"model": model, "input": "two", "previous_response_id": r1["id"]}),
        )
        .await;
        let t2 = output_text(&r2);
        let r3 = create_ok(
            &server,
            json!({"model": model, "input": "three", "previous_response_id": r2["id"]}),
        )
        .await;
        assert_eq!(r3["previous_response_id"], r2["id"]);
        assert_eq!(
            r3["conversation"]["id"], r1["conversation"]["id"],
            "one conversation"
        );
        // The third request upstream carries the whole history, kept by the server.
        let sent = sent_texts(up.received().last().unwrap());
        let want = [
            ("user", "one"),
            ("assistant", t1.as_str()),
            ("user", "two"),
            ("assistant", t2.as_str()),
            ("user", "three"),
        ];
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(r, t)| ((*r).into(), (*t).into()))
            .collect();
        assert_eq!(sent, want, "{model}");
        // Instructions belong to the response that gave them.
        let last = up.received().last().unwrap().clone();
        assert!(
            last.get("system").is_none() || last["system"].is_null(),
            "{model}: {last}"
        );

        // GET answers the stored response; input_items lists what it was given.
        let got = get_json(
            &server,
            &format!("/v1/responses/{}", r3["id"].as_str().unwrap()),
        )
        .await;
        assert_eq!(got["id"], r3["id"]);
        assert_eq!(output_text(&got), output_text(&r3));
        let items = get_json(
            &server,
            &format!("/v1/responses/{}/input_items", r3["id"].as_str().unwrap()),
        )
        .await;
        let data = items["data"].as_array().unwrap();
        assert_eq!(data.len(), 1, "{items}");
        assert_eq!(data[0]["content"][0]["text"], "three");

        // Continuing from r1 again branches: the new turn does not see r2 and r3.
        create_ok(
            &server,
            json!({"model": model, "input": "other", "previous_response_id": r1["id"]}),
        )
        .await;
        let sent = sent_texts(up.received().last().unwrap());
        assert_eq!(sent.len(), 3, "{model}: {sent:?}");
        assert_eq!(sent[2].1, "other");
    }
}

/// The events of a streamed response: their types, and the parsed events.
async fn stream_events(server: &TestServer, body: Value) -> Vec<Value> {
    let resp = create(server, None, body).await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    sse_events(&text)
        .into_iter()
        .map(|e| {
            let v: Value = serde_json::from_str(&e.data).unwrap();
            assert_eq!(Some(v["type"].as_str().unwrap()), e.event.as_deref());
            v
        })
        .collect()
}

#[tokio::test]
async fn streamed_responses_send_typed_events_in_order() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start(both_routes(&up));
    for model in MODELS {
        let events = stream_events(
            &server,
            json!({"model": model, "input": "tell me", "stream": true}),
        )
        .await;
        let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        let deltas = types
            .iter()
            .filter(|t| **t == "response.output_text.delta")
            .count();
        assert!(deltas > 1, "{types:?}");
        let mut want = vec![
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
        ];
        want.extend(std::iter::repeat_n("response.output_text.delta", deltas));
        want.extend([
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]);
        assert_eq!(types, want, "{model}");
        for (i, e) in events.iter().enumerate() {
            assert_eq!(e["sequence_number"], i as u64);
        }
        let text: String = events
            .iter()
            .filter(|e| e["type"] == "response.output_text.delta")
            .map(|e| e["delta"].as_str().unwrap())
            .collect();
        let done = events.last().unwrap();
        assert_eq!(output_text(&done["response"]), text);
        assert_eq!(done["response"]["status"], "completed");
        // The stored response is the streamed one.
        let id = done["response"]["id"].as_str().unwrap();
        let got = get_json(&server, &format!("/v1/responses/{id}")).await;
        assert_eq!(output_text(&got), text);
    }
}

fn weather() -> Value {
    json!([{"type": "function", "name": "weather", "description": "the weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}])
}

#[tokio::test]
async fn a_function_call_round_trip() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start(both_routes(&up));
    for model in MODELS {
        let r1 = create_ok(
            &server,
            json!({"model": model, "input": "Lima [[mock:tool]]", "tools": weather()}),
        )
        .await;
        let call = &r1["output"][0];
        assert_eq!(call["type"], "function_call", "{r1}");
        assert_eq!(call["name"], "weather");
        let args: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(args, json!({"city": "Lima"}));
        let call_id = call["call_id"].as_str().unwrap();
        // A stray output is refused and nothing runs.
        let before = up.requests();
        let resp = create(
            &server,
            None,
            json!({"model": model, "previous_response_id": r1["id"], "tools": weather(),
            "input": [{"type": "function_call_output", "call_id": "call_nope", "output": "x"}]}),
        )
        .await;
        expect_error(resp, 400, "bad_request").await;
        assert_eq!(up.requests(), before);
        let r2 = create_ok(
            &server,
            json!({"model": model, "previous_response_id": r1["id"], "tools": weather(),
            "input": [{"type": "function_call_output", "call_id": call_id, "output": "warm"}]}),
        )
        .await;
        assert_eq!(output_text(&r2), "Tool results: warm.", "{model}: {r2}");
        let items = get_json(
            &server,
            &format!("/v1/responses/{}/input_items", r2["id"].as_str().unwrap()),
        )
        .await;
        assert_eq!(items["data"][0]["type"], "function_call_output", "{items}");
        assert_eq!(items["data"][0]["call_id"], call_id);

        // Streamed: the call's arguments arrive as argument deltas.
        let events = stream_events(&server, json!({"model": model, "input": "Quito [[mock:tool]]", "tools": weather(), "stream": true})).await;
        let args: String = events
            .iter()
            .filter(|e| e["type"] == "response.function_call_arguments.delta")
            .map(|e| e["delta"].as_str().unwrap())
            .collect();
        assert_eq!(
            serde_json::from_str::<Value>(&args).unwrap(),
            json!({"city": "Quito"})
        );
        let done = events
            .iter()
            .find(|e| e["type"] == "response.function_call_arguments.done")
            .unwrap();
        assert_eq!(done["arguments"].as_str().unwrap(), args);
        assert_eq!(events.last().unwrap()["type"], "response.completed");
    }
}

#[tokio::test]
async fn responses_belong_to_their_tenant_and_can_be_deleted() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start_with_admin(both_routes(&up));
    let (_, a) = server.create_key(json!({"tenant": "a"})).await;
    let (_, b) = server.create_key(json!({"tenant": "b"})).await;
    let resp = create(&server, Some(&a), json!({"model": "up", "input": "mine"})).await;
    assert_eq!(resp.status(), 200);
    let r: Value = resp.json().await.unwrap();
    let id = r["id"].as_str().unwrap();
    let path = format!("/v1/responses/{id}");
    for p in [path.clone(), format!("{path}/input_items")] {
        let resp = with_key(http().get(server.url(&p)), Some(&b))
            .send()
            .await
            .unwrap();
        expect_error(resp, 404, "not_found").await;
    }
    // Nor can b continue a's chain.
    let resp = create(
        &server,
        Some(&b),
        json!({"model": "up", "input": "x", "previous_response_id": id}),
    )
    .await;
    expect_error(resp, 404, "not_found").await;
    let resp = with_key(http().delete(server.url(&path)), Some(&a))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = with_key(http().get(server.url(&path)), Some(&a))
        .send()
        .await
        .unwrap();
    expect_error(resp, 404, "not_found").await;
}

#[tokio::test]
async fn store_false_keeps_nothing_and_idempotency_keys_answer_once() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start(both_routes(&up));
    let r1 = create_ok(&server, json!({"model": "up", "input": "remember this"})).await;
    let r2 = create_ok(&server, json!({"model": "up", "input": "and now?", "store": false, "previous_response_id": r1["id"]})).await;
    assert_eq!(r2["store"], false);
    // The history went upstream, but nothing was kept.
    assert_eq!(sent_texts(up.received().last().unwrap()).len(), 3);
    let resp = http()
        .get(server.url(&format!("/v1/responses/{}", r2["id"].as_str().unwrap())))
        .send()
        .await
        .unwrap();
    expect_error(resp, 404, "not_found").await;
    let conv = r1["conversation"]["id"].as_str().unwrap();
    assert_eq!(messages(&server, None, conv).await.len(), 2);

    // The same Idempotency-Key twice: one turn upstream, the same response.
    let before = up.requests();
    let send = || {
        http()
            .post(server.url("/v1/responses"))
            .header("Idempotency-Key", "k-1")
            .json(&json!({"model": "up", "input": "once please"}))
            .send()
    };
    let a: Value = send().await.unwrap().json().await.unwrap();
    let b: Value = send().await.unwrap().json().await.unwrap();
    assert_eq!(a["id"], b["id"]);
    assert_eq!(output_text(&a), output_text(&b));
    assert_eq!(up.requests(), before + 1);
}

const SDK_SCRIPT: &str = r#"
import json, os, sys
import openai

client = openai.OpenAI(base_url=f"http://{sys.argv[1]}/v1", api_key="local", max_retries=0, timeout=20)
model = sys.argv[2]
out = {}
r1 = client.responses.create(model=model, input="first question")
r2 = client.responses.create(model=model, input="second question", previous_response_id=r1.id)
r3 = client.responses.create(model=model, input="third question", previous_response_id=r2.id)
out["texts"] = [r1.output_text, r2.output_text, r3.output_text]
out["ids"] = [r1.id, r2.id, r3.id]
out["usage"] = r3.usage.input_tokens
events = list(client.responses.create(model=model, input="stream it", stream=True))
out["event_types"] = [e.type for e in events]
out["stream_text"] = "".join(e.delta for e in events if e.type == "response.output_text.delta")
out["stream_final"] = events[-1].response.output_text
tools = [{"type": "function", "name": "weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
c = client.responses.create(model=model, input="Oslo [[mock:tool]]", tools=tools)
call = c.output[0]
out["call"] = {"type": call.type, "name": call.name, "arguments": json.loads(call.arguments)}
a = client.responses.create(model=model, previous_response_id=c.id, tools=tools,
    input=[{"type": "function_call_output", "call_id": call.call_id, "output": "cold"}])
out["after_call"] = a.output_text
img = client.responses.create(model=model, input=[{"role": "user", "content": [
    {"type": "input_text", "text": "what is this"},
    {"type": "input_image", "image_url": "https://example.com/cat.png", "detail": "low"}]}])
out["image"] = img.output_text
got = client.responses.retrieve(r3.id)
out["retrieved"] = got.output_text
items = client.responses.input_items.list(r3.id)
out["items"] = [i.type for i in items.data]
client.responses.delete(r3.id)
try:
    client.responses.retrieve(r3.id)
    out["after_delete"] = "found"
except openai.NotFoundError as e:
    out["after_delete"] = e.status_code
print(json.dumps(out))
"#;

#[tokio::test]
async fn official_python_sdk_responses() {
    let (ok, _, err) = python(vec!["-c".into(), "import openai".into()], vec![]).await;
    assert!(
        ok,
        "the official OpenAI Python SDK is not importable: {err}"
    );
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start(both_routes(&up));
    for model in MODELS {
        let (ok, stdout, stderr) = python(
            vec![
                "-c".into(),
                SDK_SCRIPT.into(),
                server.addr.to_string(),
                model.into(),
            ],
            vec![],
        )
        .await;
        assert!(ok, "{model}: the SDK script failed:\n{stderr}\n{stdout}");
        let out: Value = serde_json::from_str(stdout.trim()).unwrap();
        let texts = out["texts"].as_array().unwrap();
        assert!(
            texts.iter().all(|t| !t.as_str().unwrap().is_empty()),
            "{out}"
        );
        assert_eq!(out["event_types"][0], "response.created", "{out}");
        assert_eq!(
            out["event_types"].as_array().unwrap().last().unwrap(),
            "response.completed"
        );
        assert_eq!(out["stream_text"], out["stream_final"], "{out}");
        assert_eq!(
            out["call"],
            json!({"type": "function_call", "name": "weather", "arguments": {"city": "Oslo"}}),
            "{out}"
        );
        assert_eq!(out["after_call"], "Tool results: cold.", "{out}");
        assert!(
            out["image"].as_str().unwrap().starts_with("I see 1 image"),
            "{out}"
        );
        assert_eq!(out["retrieved"], texts[2], "{out}");
        assert_eq!(out["items"], json!(["message"]), "{out}");
        assert_eq!(out["after_delete"], 404, "{out}");
    }
    // The third turn of the chain went upstream with the first two and their answers.
    let chains: Vec<Value> = up
        .received()
        .into_iter()
        .filter(|b| {
            sent_texts(b)
                .last()
                .is_some_and(|(_, t)| t == "third question")
        })
        .collect();
    assert_eq!(chains.len(), 2);
    for body in chains {
        let roles: Vec<String> = sent_texts(&body).into_iter().map(|(r, _)| r).collect();
        assert_eq!(
            roles,
            ["user", "assistant", "user", "assistant", "user"],
            "{body}"
        );
    }
}
