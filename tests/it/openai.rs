//! The OpenAI-compatible surface (PROTOCOL §4): `POST /v1/chat/completions` as JSON and SSE,
//! `GET /v1/models`, its errors, and the official OpenAI Python SDK against it.

use crate::common::*;
use serde_json::{json, Value};

async fn chat(server: &TestServer, key: Option<&str>, body: Value) -> reqwest::Response {
    with_key(http().post(server.url("/v1/chat/completions")), key)
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// The `data:` payloads of an OpenAI stream, `[DONE]` included.
async fn stream_data(resp: reqwest::Response) -> Vec<String> {
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let events = sse_events(&resp.text().await.unwrap());
    for e in &events {
        assert_eq!(e.event, None, "OpenAI streams have unnamed events: {e:?}");
    }
    events.into_iter().map(|e| e.data).collect()
}

#[tokio::test]
async fn json_completion() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start(config_with(Some(&up)));
    let resp = chat(
        &server,
        None,
        json!({"model": "up", "messages": [{"role": "user", "content": "hi there"}]}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    let plan = mock_plan(0, &[("user", "hi there")]);
    assert_eq!(v["object"], "chat.completion", "{v}");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"), "{v}");
    assert!(v["created"].is_i64());
    assert_eq!(v["model"], "mock-1");
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 1);
    assert_eq!(choices[0]["index"], 0);
    assert_eq!(choices[0]["message"]["role"], "assistant");
    assert_eq!(
        choices[0]["message"]["content"],
        mock_reply(0, &[("user", "hi there")]).as_str()
    );
    assert_eq!(choices[0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["prompt_tokens"], plan.prompt_tokens);
    assert_eq!(v["usage"]["completion_tokens"], plan.completion_tokens);
    assert_eq!(
        v["usage"]["total_tokens"],
        plan.prompt_tokens + plan.completion_tokens
    );

    // The whole conversation goes upstream, system prompt included.
    let msgs = [
        ("system", "you are terse"),
        ("user", "a"),
        ("assistant", "b"),
        ("user", "c"),
    ];
    let body = json!({"model": "up", "messages": msgs.iter().map(|(r, c)| json!({"role": r, "content": c})).collect::<Vec<_>>()});
    let v: Value = chat(&server, None, body).await.json().await.unwrap();
    assert_eq!(
        v["choices"][0]["message"]["content"],
        mock_reply(0, &msgs).as_str(),
        "{v}"
    );
    assert_eq!(up.requests(), 2);
}

#[tokio::test]
async fn streamed_completion() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start(config_with(Some(&up)));
    let expected = mock_plan(0, &[("user", "stream to me")]);
    let body = json!({
        "model": "up", "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "stream to me"}],
    });
    let data = stream_data(chat(&server, None, body).await).await;
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"));
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk", "{c}");
        assert_eq!(c["id"], id, "{c}");
        assert_eq!(c["model"], "mock-1", "{c}");
    }
    assert_eq!(
        chunks[0]["choices"][0]["delta"]["role"], "assistant",
        "{}",
        chunks[0]
    );

    // The usage chunk comes last, with no choices; the finish chunk right before it.
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]), "{usage_chunk}");
    assert_eq!(
        usage_chunk["usage"]["prompt_tokens"],
        expected.prompt_tokens
    );
    assert_eq!(
        usage_chunk["usage"]["completion_tokens"],
        expected.completion_tokens
    );
    assert_eq!(
        usage_chunk["usage"]["total_tokens"],
        expected.prompt_tokens + expected.completion_tokens
    );
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop", "{finish}");
    let finishes = chunks
        .iter()
        .filter(|c| !c["choices"][0]["finish_reason"].is_null())
        .count();
    assert_eq!(finishes, 1, "{chunks:?}");

    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, expected.text());
    let content_chunks = chunks
        .iter()
        .filter(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
        })
        .count();
    assert!(
        content_chunks > 1,
        "the reply should arrive in several chunks: {chunks:?}"
    );

    // Without include_usage there is no usage chunk.
    let body = json!({"model": "up", "stream": true, "messages": [{"role": "user", "content": "stream to me"}]});
    let data = stream_data(chat(&server, None, body).await).await;
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(
        chunks
            .iter()
            .all(|c| c["choices"].as_array().unwrap().len() == 1),
        "{chunks:?}"
    );
    assert!(
        chunks
            .iter()
            .all(|c| c.get("usage").is_none_or(Value::is_null)),
        "{chunks:?}"
    );
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, expected.text());
}

/// A reply that trickles in reaches the client as it comes (the first words long before the
/// last), and a client that leaves part-way is billed for what streamed: the generation, which
/// the response was driving, finishes on its own and settles.
#[tokio::test]
async fn a_stream_arrives_as_it_comes_and_a_client_that_leaves_is_billed() {
    use futures_util::StreamExt;
    let up = MockUpstream::spawn(Behaviour {
        tokens_per_sec: 20.0,
        ..Behaviour::default()
    })
    .unwrap();
    let server = TestServer::start(config_with(Some(&up)));
    let question = "tell me a long story about the sea";
    let expected = mock_plan(0, &[("user", question)]);
    assert!(expected.chunks.len() >= 6, "{:?}", expected.chunks);
    let body =
        json!({"model": "up", "stream": true, "messages": [{"role": "user", "content": question}]});
    let resp = chat(&server, None, body).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut seen = String::new();
    let has_words = |seen: &str| {
        sse_events(seen).iter().any(|e| {
            serde_json::from_str::<Value>(&e.data).is_ok_and(|c| {
                c["choices"][0]["delta"]["content"]
                    .as_str()
                    .is_some_and(|t| !t.is_empty())
            })
        })
    };
    while !has_words(&seen) {
        let chunk = tokio::time::timeout(TIMEOUT, body.next())
            .await
            .expect("the first words in time")
            .expect("the stream goes on")
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    // At 20 chunks a second the rest of the reply is still being written upstream.
    assert!(!seen.contains("[DONE]"), "{seen}");
    assert!(!seen.contains("finish_reason\":\"stop"), "{seen}");
    drop(body);

    let end = std::time::Instant::now() + TIMEOUT;
    let total = loop {
        let v = get_json(&server, "/v1/usage").await;
        if v["total"]["requests"] == 1 || std::time::Instant::now() > end {
            break v["total"].clone();
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(total["requests"], 1, "{total}");
    assert_eq!(total["prompt_tokens"], expected.prompt_tokens, "{total}");
    let billed = total["completion_tokens"].as_u64().unwrap();
    assert!(
        billed > 0 && billed < u64::from(expected.completion_tokens),
        "billed {billed} of {} completion tokens: {total}",
        expected.completion_tokens
    );
}

#[tokio::test]
async fn content_as_a_list_of_text_parts() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start(config_with(Some(&up)));
    let body = json!({"model": "up", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hello "},
        {"type": "text", "text": "world"},
    ]}]});
    let resp = chat(&server, None, body).await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        v["choices"][0]["message"]["content"],
        mock_reply(0, &[("user", "hello world")]).as_str(),
        "{v}"
    );
    // Parts pass to an OpenAI-compatible upstream as they came.
    assert_eq!(
        up.received().last().unwrap()["messages"][0]["content"],
        json!([{"type": "text", "text": "hello "}, {"type": "text", "text": "world"}])
    );
}

#[tokio::test]
async fn request_errors() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start(config_with(Some(&up)));
    let resp = chat(
        &server,
        None,
        json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(
        expect_error(resp, 404, "model_not_found").await,
        error_body("model_not_found", "model \"nope\" does not exist")
    );
    let resp = chat(
        &server,
        None,
        json!({"model": "nope", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    expect_error(resp, 404, "model_not_found").await;

    let resp = chat(&server, None, json!({"model": "up", "messages": []})).await;
    expect_error(resp, 400, "bad_request").await;
    let resp = chat(&server, None, json!({"model": "up"})).await;
    expect_error(resp, 400, "bad_request").await;
    let resp = chat(
        &server,
        None,
        json!({"model": "up", "messages": [{"role": "wizard", "content": "hi"}]}),
    )
    .await;
    expect_error(resp, 400, "bad_request").await;
    let resp = chat(
        &server,
        None,
        json!({"model": "up", "messages": [{"role": "user", "content": 42}]}),
    )
    .await;
    expect_error(resp, 400, "bad_request").await;
    let resp = http()
        .post(server.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body("{\"model\":")
        .send()
        .await
        .unwrap();
    expect_error(resp, 400, "bad_request").await;
    assert_eq!(up.requests(), 0);
}

#[tokio::test]
async fn upstream_rate_limit_is_429_with_retry_after() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start(config_with(Some(&up)));
    for stream in [false, true] {
        let body = json!({"model": "up", "stream": stream, "messages": [{"role": "user", "content": "slow down [[mock:status=429]]"}]});
        let resp = chat(&server, None, body).await;
        let retry_after = resp
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned());
        expect_error(resp, 429, "rate_limited").await;
        let secs: u64 = retry_after
            .expect("429 without Retry-After")
            .parse()
            .unwrap();
        assert!((1..=60).contains(&secs), "Retry-After {secs}");
    }

    let body = json!({"model": "up", "messages": [{"role": "user", "content": "broken [[mock:status=500]]"}]});
    expect_error(chat(&server, None, body).await, 502, "upstream_error").await;
}

#[tokio::test]
async fn models_lists_the_routes() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start(config_with(Some(&up)));
    let resp = http().get(server.url("/v1/models")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "list");
    let data = v["data"].as_array().unwrap();
    let ids: Vec<&str> = data.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert!(ids.contains(&"mock") && ids.contains(&"up"), "{ids:?}");
    for m in data {
        assert_eq!(m["object"], "model", "{m}");
        assert!(m["owned_by"].is_string(), "{m}");
        assert!(m["created"].is_i64(), "{m}");
    }
}

const SDK_SCRIPT: &str = r#"
import json, os, sys
import openai

client = openai.OpenAI(base_url=f"http://{sys.argv[1]}/v1", api_key=os.environ["PARLEY_TEST_KEY"], max_retries=0, timeout=10)
messages = [{"role": "user", "content": "hello from the sdk"}]
out = {}

r = client.chat.completions.create(model="up", messages=messages)
out["object"] = r.object
out["id"] = r.id
out["model"] = r.model
out["role"] = r.choices[0].message.role
out["content"] = r.choices[0].message.content
out["finish_reason"] = r.choices[0].finish_reason
out["usage"] = r.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"})

chunks = list(client.chat.completions.create(model="up", messages=messages, stream=True, stream_options={"include_usage": True}))
out["stream_objects"] = sorted({c.object for c in chunks})
out["stream_role"] = chunks[0].choices[0].delta.role
out["stream_text"] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
out["stream_finish"] = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
last = chunks[-1]
out["stream_last_choices"] = len(last.choices)
out["stream_usage"] = last.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"}) if last.usage else None

out["models"] = sorted(m.id for m in client.models.list())

try:
    client.chat.completions.create(model="nope", messages=messages)
    out["not_found"] = None
except openai.NotFoundError as e:
    out["not_found"] = {"status": e.status_code, "code": e.code, "type": e.type}

print(json.dumps(out))
"#;

#[tokio::test]
async fn official_python_sdk() {
    let (ok, _, err) = python(vec!["-c".into(), "import openai".into()], vec![]).await;
    assert!(ok, "the official OpenAI Python SDK is not importable; run `pip install openai` (CI installs it):\n{err}");

    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start_with_admin(config_with(Some(&up)));
    let (_, key) = server.create_key(json!({"tenant": "sdk"})).await;
    let (ok, stdout, stderr) = python(
        vec!["-c".into(), SDK_SCRIPT.into(), server.addr.to_string()],
        vec![("PARLEY_TEST_KEY".into(), key)],
    )
    .await;
    assert!(ok, "the SDK script failed:\n{stderr}\n{stdout}");
    let out: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("SDK output is not JSON ({e}): {stdout}\n{stderr}"));

    let plan = mock_plan(0, &[("user", "hello from the sdk")]);
    let usage = json!({
        "prompt_tokens": plan.prompt_tokens,
        "completion_tokens": plan.completion_tokens,
        "total_tokens": plan.prompt_tokens + plan.completion_tokens,
    });
    assert_eq!(out["object"], "chat.completion", "{out}");
    assert!(out["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(out["model"], "mock-1");
    assert_eq!(out["role"], "assistant");
    assert_eq!(out["content"], plan.text().as_str(), "{out}");
    assert_eq!(out["finish_reason"], "stop");
    assert_eq!(out["usage"], usage, "{out}");

    assert_eq!(
        out["stream_objects"],
        json!(["chat.completion.chunk"]),
        "{out}"
    );
    assert_eq!(out["stream_role"], "assistant");
    assert_eq!(out["stream_text"], plan.text().as_str(), "{out}");
    assert_eq!(out["stream_finish"], json!(["stop"]), "{out}");
    assert_eq!(out["stream_last_choices"], 0, "{out}");
    assert_eq!(out["stream_usage"], usage, "{out}");

    let models = out["models"].as_array().unwrap();
    assert!(
        models.contains(&json!("mock")) && models.contains(&json!("up")),
        "{out}"
    );
    assert_eq!(
        out["not_found"],
        json!({"status": 404, "code": "model_not_found", "type": "not_found_error"}),
        "{out}"
    );
    // The same question twice: the streamed answer came from the semantic cache, and the SDK
    // could not tell.
    assert_eq!(up.requests(), 1);
}

const BATCH_SCRIPT: &str = r#"
import json, os, sys, time
import openai

client = openai.OpenAI(base_url="http://%s/v1" % sys.argv[1], api_key=os.environ["PARLEY_TEST_KEY"], max_retries=0)
lines = []
for i in range(1000):
    if i % 100 == 7:
        lines.append("this line is not JSON")
    elif i % 100 == 13:
        lines.append(json.dumps({"custom_id": "r%d" % i, "method": "POST", "url": "/v1/embeddings", "body": {}}))
    else:
        lines.append(json.dumps({"custom_id": "r%d" % i, "method": "POST", "url": "/v1/chat/completions",
                                 "body": {"model": "up", "messages": [{"role": "user", "content": "batch line %d" % i}]}}))
f = client.files.create(file=("requests.jsonl", ("\n".join(lines) + "\n").encode()), purpose="batch")
b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"run": "sdk"})
deadline = time.time() + 120
while b.status not in ("completed", "failed", "cancelled", "expired") and time.time() < deadline:
    time.sleep(0.1)
    b = client.batches.retrieve(b.id)
out = client.files.content(b.output_file_id).text if b.output_file_id else ""
err = client.files.content(b.error_file_id).text if b.error_file_id else ""
print(json.dumps({
    "status": b.status,
    "counts": b.request_counts.model_dump(),
    "metadata": b.metadata,
    "input_bytes": client.files.retrieve(f.id).bytes,
    "output": [json.loads(l) for l in out.splitlines()],
    "errors": [json.loads(l) for l in err.splitlines()],
    "listed": [x.id for x in client.batches.list()],
    "id": b.id,
}))
"#;

#[tokio::test]
async fn official_python_sdk_runs_a_batch_with_bad_lines() {
    let (ok, _, err) = python(vec!["-c".into(), "import openai".into()], vec![]).await;
    assert!(ok, "the official OpenAI Python SDK is not importable; run `pip install openai` (CI installs it):\n{err}");
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let mut cfg = config_with(Some(&up));
    cfg.cache.enabled = false;
    let server = TestServer::start_with_admin(cfg);
    let (_, key) = server.create_key(json!({"tenant": "batcher"})).await;
    let (ok, stdout, stderr) = python(
        vec!["-c".into(), BATCH_SCRIPT.into(), server.addr.to_string()],
        vec![("PARLEY_TEST_KEY".into(), key)],
    )
    .await;
    assert!(ok, "the batch script failed:\n{stderr}\n{stdout}");
    let out: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}\n{stderr}"));
    assert_eq!(out["status"], "completed", "{}", out["counts"]);
    assert_eq!(
        out["counts"],
        json!({"total": 1000, "completed": 980, "failed": 20})
    );
    assert_eq!(out["metadata"], json!({"run": "sdk"}));
    assert_eq!(out["listed"], json!([out["id"].clone()]));
    let output = out["output"].as_array().unwrap();
    assert_eq!(output.len(), 980);
    for line in output {
        let custom = line["custom_id"].as_str().unwrap();
        let i: usize = custom[1..].parse().unwrap();
        assert_eq!(line["response"]["status_code"], 200);
        assert_eq!(
            line["response"]["body"]["choices"][0]["message"]["content"],
            mock_reply(0, &[("user", &format!("batch line {i}"))]).as_str(),
            "{custom}"
        );
    }
    let errors = out["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 20);
    let not_json = errors
        .iter()
        .filter(|e| {
            e["error"]["message"]
                .as_str()
                .unwrap()
                .contains("not a batch request line")
        })
        .count();
    let wrong_url = errors
        .iter()
        .filter(|e| {
            e["error"]["message"]
                .as_str()
                .unwrap()
                .contains("/v1/embeddings")
        })
        .count();
    assert_eq!((not_json, wrong_url), (10, 10), "{errors:?}");
    assert_eq!(up.requests(), 980);
}
