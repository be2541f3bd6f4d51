//! Tools, images, structured output and request parameters on `POST /v1/chat/completions`
//! (PROTOCOL §7), against an OpenAI-compatible route (`up`) and an Anthropic route (`claude`) on
//! one real mock upstream, over real sockets: what the client sees, and what parley sent
//! upstream (`MockUpstream::received`). Ends with the official OpenAI Python SDK doing the same.

use base64::Engine;
use parley::config::{Config, ProviderConfig, ProviderKind};
use parley::mock_upstream::generator::{
    plan_request, MockChoice, MockMessage, MockRequest, MockTool,
};
use serde_json::{json, Value};

use crate::common::*;

/// The two routes every test runs against: `up` (OpenAI kind) and `claude` (Anthropic kind).
const MODELS: [&str; 2] = ["up", "claude"];

fn is_anthropic(model: &str) -> bool {
    model == "claude"
}

/// An Anthropic provider at `base_url`, its key in a fresh environment variable.
fn anthropic_provider(name: &str, base_url: &str) -> ProviderConfig {
    let env = unique_env("PARLEY_IT_TOOLS_ANTHROPIC_KEY");
    std::env::set_var(&env, "sk-ant-it-tools");
    ProviderConfig {
        kind: ProviderKind::Anthropic,
        api_key_env: Some(env),
        ..openai_provider(name, base_url)
    }
}

/// Routes `up` → provider `up` (OpenAI) and `claude` → provider `anth` (Anthropic, model
/// `claude-test`), both on `up`.
fn both_routes(up: &MockUpstream) -> Config {
    let mut cfg = config_with(Some(up));
    cfg.providers
        .push(anthropic_provider("anth", &up.base_url()));
    cfg.routes.push(route("claude", &[("anth", "claude-test")]));
    cfg
}

fn start() -> (MockUpstream, TestServer) {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start(both_routes(&up));
    (up, server)
}

async fn chat(server: &TestServer, body: &Value) -> reqwest::Response {
    http()
        .post(server.url("/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .unwrap()
}

/// A request that must succeed: its JSON answer.
async fn chat_ok(server: &TestServer, body: &Value) -> Value {
    let resp = chat(server, body).await;
    let status = resp.status();
    let text = resp.text().await.unwrap();
    assert_eq!(status, 200, "{body}\n→ {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// A request that must be refused `400 bad_request`: the error's message.
async fn bad_request(server: &TestServer, body: &Value) -> String {
    let err = expect_error(chat(server, body).await, 400, "bad_request").await;
    err["error"]["message"].as_str().unwrap().to_owned()
}

/// The chunks of an OpenAI stream, checking that `[DONE]` comes last and only there.
async fn stream_chunks(server: &TestServer, body: &Value) -> Vec<Value> {
    let resp = chat(server, body).await;
    let status = resp.status();
    let ctype = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let text = resp.text().await.unwrap();
    assert_eq!(status, 200, "{body}\n→ {text}");
    assert!(ctype.starts_with("text/event-stream"), "{ctype}: {text}");
    let events = sse_events(&text);
    let (last, rest) = events.split_last().expect("an empty stream");
    assert_eq!(last.data, "[DONE]", "{text}");
    rest.iter()
        .map(|e| {
            assert_eq!(e.event, None, "OpenAI streams have unnamed events: {e:?}");
            assert_ne!(e.data, "[DONE]", "[DONE] before the end: {text}");
            serde_json::from_str(&e.data).unwrap_or_else(|err| panic!("{err}: {}", e.data))
        })
        .collect()
}

/// A stream put back together.
#[derive(Debug, Default)]
struct Assembled {
    text: String,
    /// Whole calls: `{"id", "type", "name", "arguments"}` (arguments as the JSON text).
    calls: Vec<Value>,
    finishes: Vec<String>,
    usage: Option<Value>,
}

/// Reassembles `delta.tool_calls` fragments by index, checking that the first fragment of each
/// call carries its id, type and name, and the later ones only arguments.
fn assemble(chunks: &[Value]) -> Assembled {
    let mut out = Assembled::default();
    for c in chunks {
        assert_eq!(c["object"], "chat.completion.chunk", "{c}");
        if let Some(u) = c.get("usage").filter(|u| !u.is_null()) {
            assert_eq!(
                c["choices"],
                json!([]),
                "the usage chunk has no choices: {c}"
            );
            assert!(out.usage.is_none(), "two usage chunks");
            out.usage = Some(u.clone());
        }
        for choice in c["choices"].as_array().unwrap() {
            assert!(out.finishes.is_empty(), "a chunk after the finish: {c}");
            let delta = &choice["delta"];
            if let Some(t) = delta["content"].as_str() {
                out.text.push_str(t);
            }
            if let Some(f) = choice["finish_reason"].as_str() {
                out.finishes.push(f.to_owned());
            }
            for frag in delta["tool_calls"].as_array().into_iter().flatten() {
                let i = frag["index"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("no index: {c}")) as usize;
                let args = frag["function"]["arguments"].as_str().unwrap_or("");
                if i == out.calls.len() {
                    assert!(frag["id"].is_string(), "the first fragment has the id: {c}");
                    assert_eq!(frag["type"], "function", "{c}");
                    assert!(frag["function"]["name"].is_string(), "{c}");
                    out.calls.push(json!({
                        "id": frag["id"], "type": "function",
                        "name": frag["function"]["name"], "arguments": args,
                    }));
                } else {
                    assert!(i < out.calls.len(), "call indexes come in order: {c}");
                    assert!(
                        frag["id"].is_null(),
                        "only the first fragment has the id: {c}"
                    );
                    assert!(frag["function"]["name"].is_null(), "{c}");
                    let prev = out.calls[i]["arguments"].as_str().unwrap().to_owned();
                    out.calls[i]["arguments"] = Value::from(prev + args);
                }
            }
        }
    }
    out
}

fn weather_tool() -> Value {
    json!({"type": "function", "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    }})
}

fn time_tool() -> Value {
    json!({"type": "function", "function": {
        "name": "get_time",
        "description": "The local time in a zone",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string"}, "precise": {"type": "boolean"}},
        },
    }})
}

fn tools() -> Value {
    json!([weather_tool(), time_tool()])
}

/// The arguments the mock writes for `tool` given the user's text (directives removed).
fn args_for(tool: &str, text: &str) -> Value {
    match tool {
        "get_weather" => json!({"city": text, "days": 1, "unit": "celsius"}),
        "get_time" => json!({"zone": text, "precise": true}),
        other => panic!("no such tool {other}"),
    }
}

/// The ids the mock gives the calls of a request with the single user message `text`, these
/// tools and `choice`: `call_<i>_<hash>` on the OpenAI wire, `toolu_<i>_<hash>` on Anthropic's.
fn expected_ids(model: &str, text: &str, tools: &Value, choice: MockChoice) -> Vec<String> {
    let req = MockRequest {
        messages: vec![MockMessage {
            role: "user".into(),
            content: text.into(),
        }],
        tools: tools
            .as_array()
            .unwrap()
            .iter()
            .map(|t| MockTool {
                name: t["function"]["name"].as_str().unwrap().into(),
                parameters: t["function"]["parameters"].clone(),
            })
            .collect(),
        choice,
        ..MockRequest::default()
    };
    plan_request(0, &req)
        .tool_calls
        .into_iter()
        .map(|c| {
            if is_anthropic(model) {
                c.id.replacen("call_", "toolu_", 1)
            } else {
                c.id
            }
        })
        .collect()
}

/// A call of a non-streamed answer as `(id, name, arguments as JSON)`.
fn call_of(c: &Value) -> (String, String, Value) {
    assert_eq!(c["type"], "function", "{c}");
    let args = c["function"]["arguments"]
        .as_str()
        .unwrap_or_else(|| panic!("{c}"));
    (
        c["id"].as_str().unwrap().to_owned(),
        c["function"]["name"].as_str().unwrap().to_owned(),
        serde_json::from_str(args).unwrap_or_else(|e| panic!("arguments are not JSON ({e}): {c}")),
    )
}

/// The body upstream received last.
fn last_received(up: &MockUpstream) -> Value {
    up.received()
        .last()
        .cloned()
        .expect("upstream received nothing")
}

/// Anthropic `messages` with every string content written as its one text block (the API takes
/// both forms).
fn anthropic_blocks(messages: &Value) -> Value {
    let mut out = messages.clone();
    for m in out.as_array_mut().unwrap() {
        if let Some(text) = m["content"].as_str() {
            m["content"] = json!([{"type": "text", "text": text}]);
        }
    }
    out
}

/// A real PNG header (signature, IHDR with the size, IEND), enough to read its size from.
fn png(width: u32, height: u32) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut c = 0xffff_ffffu32;
        for b in bytes {
            c ^= u32::from(*b);
            for _ in 0..8 {
                c = if c & 1 == 1 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }
    let mut out = vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
    let mut chunk = |kind: &[u8], data: &[u8]| {
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        out.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(b"IHDR", &ihdr);
    chunk(b"IEND", &[]);
    out
}

fn png_base64(width: u32, height: u32) -> String {
    base64::engine::general_purpose::STANDARD.encode(png(width, height))
}

// ---------------------------------------------------------------------------------------------
// 1. Tool calls, not streamed.

#[tokio::test]
async fn a_tool_call_comes_back_with_its_arguments() {
    let (up, server) = start();
    for model in MODELS {
        let text = "weather in Paris";
        let prompt = format!("{text} [[mock:tool]]");
        let body = json!({"model": model, "tools": tools(),
                          "messages": [{"role": "user", "content": prompt}]});
        let v = chat_ok(&server, &body).await;
        let choice = &v["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls", "{model}: {v}");
        assert_eq!(choice["message"]["role"], "assistant", "{v}");
        assert_eq!(choice["message"]["content"], Value::Null, "{model}: {v}");
        let calls = choice["message"]["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 1, "{model}: {v}");
        let (id, name, args) = call_of(&calls[0]);
        assert_eq!(
            vec![id.clone()],
            expected_ids(model, &prompt, &tools(), MockChoice::Auto),
            "{model}"
        );
        assert!(
            id.starts_with(if is_anthropic(model) {
                "toolu_0_"
            } else {
                "call_0_"
            }),
            "{id}"
        );
        assert_eq!(name, "get_weather");
        assert_eq!(args, args_for("get_weather", text), "{model}");
        assert!(v["usage"]["completion_tokens"].as_u64().unwrap() > 0, "{v}");

        // What went upstream.
        let sent = last_received(&up);
        if is_anthropic(model) {
            assert_eq!(sent["model"], "claude-test");
            assert_eq!(
                sent["tools"],
                json!([
                    {"name": "get_weather", "description": "The weather in a city",
                     "input_schema": weather_tool()["function"]["parameters"]},
                    {"name": "get_time", "description": "The local time in a zone",
                     "input_schema": time_tool()["function"]["parameters"]},
                ]),
                "{sent}"
            );
            assert!(sent.get("tool_choice").is_none(), "{sent}");
            assert_eq!(
                anthropic_blocks(&sent["messages"]),
                json!([{"role": "user", "content": [{"type": "text", "text": prompt}]}]),
                "{sent}"
            );
        } else {
            assert_eq!(sent["model"], "mock-1");
            assert_eq!(
                sent["tools"],
                tools(),
                "the tools go upstream as sent: {sent}"
            );
            assert_eq!(
                sent["messages"],
                json!([{"role": "user", "content": prompt}]),
                "{sent}"
            );
        }
    }
    assert_eq!(up.requests(), 2);
}

#[tokio::test]
async fn parallel_tool_calls_come_back_in_order() {
    let (up, server) = start();
    for model in MODELS {
        let text = "Paris, now";
        let prompt = format!("{text} [[mock:tools=2]]");
        let body = json!({"model": model, "tools": tools(), "parallel_tool_calls": true,
                          "messages": [{"role": "user", "content": prompt}]});
        let v = chat_ok(&server, &body).await;
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
        assert_eq!(v["choices"][0]["message"]["content"], Value::Null, "{v}");
        let calls: Vec<_> = v["choices"][0]["message"]["tool_calls"]
            .as_array()
            .unwrap()
            .iter()
            .map(call_of)
            .collect();
        let ids: Vec<String> = calls.iter().map(|c| c.0.clone()).collect();
        assert_eq!(
            ids,
            expected_ids(model, &prompt, &tools(), MockChoice::Auto),
            "{model}: {v}"
        );
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].1, "get_weather");
        assert_eq!(calls[0].2, args_for("get_weather", text));
        assert_eq!(calls[1].1, "get_time");
        assert_eq!(calls[1].2, args_for("get_time", text));
        let sent = last_received(&up);
        if is_anthropic(model) {
            // Parallel use is Anthropic's default: nothing to say about it.
            assert!(
                sent.get("tool_choice").is_none()
                    || sent["tool_choice"]["disable_parallel_tool_use"] == false,
                "{sent}"
            );
        } else {
            assert_eq!(sent["parallel_tool_calls"], true, "{sent}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Tool calls, streamed.

#[tokio::test]
async fn streamed_tool_calls_reassemble_from_their_fragments() {
    let (up, server) = start();
    for model in MODELS {
        let text = "météo Zürich 東京 today";
        let prompt = format!("{text} [[mock:tools=2]]");
        let body = json!({"model": model, "tools": tools(), "stream": true,
                          "stream_options": {"include_usage": true},
                          "messages": [{"role": "user", "content": prompt}]});
        let chunks = stream_chunks(&server, &body).await;
        assert_eq!(
            chunks[0]["choices"][0]["delta"]["role"], "assistant",
            "{}",
            chunks[0]
        );
        let id = chunks[0]["id"].as_str().unwrap();
        assert!(id.starts_with("chatcmpl-"), "{id}");
        assert!(
            chunks.iter().all(|c| c["id"] == id),
            "one id for the whole stream"
        );
        let got = assemble(&chunks);
        assert_eq!(
            got.text, "",
            "{model}: a tool-call reply has no text: {chunks:?}"
        );
        assert_eq!(got.finishes, ["tool_calls"], "{model}: {chunks:?}");
        let ids: Vec<&str> = got
            .calls
            .iter()
            .map(|c| c["id"].as_str().unwrap())
            .collect();
        assert_eq!(
            ids,
            expected_ids(model, &prompt, &tools(), MockChoice::Auto)
        );
        let names: Vec<&str> = got
            .calls
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["get_weather", "get_time"], "{model}");
        for c in &got.calls {
            let args: Value = serde_json::from_str(c["arguments"].as_str().unwrap()).unwrap();
            assert_eq!(
                args,
                args_for(c["name"].as_str().unwrap(), text),
                "{model}: {c}"
            );
        }
        // The arguments really came in pieces.
        let fragments = chunks
            .iter()
            .filter(|c| !c["choices"][0]["delta"]["tool_calls"].is_null())
            .count();
        assert!(fragments > 4, "{model}: {fragments} fragments: {chunks:?}");
        // The finish chunk, then the usage chunk; the usage counts the calls.
        let usage = got
            .usage
            .unwrap_or_else(|| panic!("{model}: no usage chunk"));
        assert!(usage["completion_tokens"].as_u64().unwrap() > 0, "{usage}");
        assert!(usage["prompt_tokens"].as_u64().unwrap() > 0, "{usage}");
        assert_eq!(
            usage["total_tokens"].as_u64().unwrap(),
            usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
        );
        let finish_at = chunks
            .iter()
            .position(|c| !c["choices"][0]["finish_reason"].is_null())
            .unwrap();
        assert_eq!(finish_at, chunks.len() - 2, "{model}: {chunks:?}");

        // The same request not streamed gives the same calls.
        let mut plain = body.clone();
        plain["stream"] = json!(false);
        plain.as_object_mut().unwrap().remove("stream_options");
        let v = chat_ok(&server, &plain).await;
        let whole: Vec<Value> = v["choices"][0]["message"]["tool_calls"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                json!({"id": c["id"], "type": c["type"], "name": c["function"]["name"],
                       "arguments": c["function"]["arguments"]})
            })
            .collect();
        assert_eq!(whole, got.calls, "{model}");
    }
    assert_eq!(up.requests(), 4);
}

// ---------------------------------------------------------------------------------------------
// 3. The whole loop: call, results, answer.

#[tokio::test]
async fn tool_results_go_back_and_get_an_answer() {
    let (up, server) = start();
    for model in MODELS {
        let prompt = "weather and time in Oslo [[mock:tools=2]]";
        let first = json!({"model": model, "tools": tools(),
                           "messages": [{"role": "user", "content": prompt}]});
        let v = chat_ok(&server, &first).await;
        let assistant = v["choices"][0]["message"].clone();
        let calls = assistant["tool_calls"].as_array().unwrap().clone();
        assert_eq!(calls.len(), 2, "{v}");

        let mut messages = vec![
            json!({"role": "developer", "content": "answer briefly"}),
            json!({"role": "user", "content": prompt}),
            assistant.clone(),
        ];
        messages.push(json!({"role": "tool", "tool_call_id": calls[0]["id"],
                             "content": "4 degrees and snowing"}));
        // A result may come as text parts too.
        let parts = json!([{"type": "text", "text": "error: "},
                           {"type": "text", "text": "the clock service is down"}]);
        messages.push(json!({"role": "tool", "tool_call_id": calls[1]["id"], "content": parts}));
        let second = json!({"model": model, "tools": tools(), "messages": messages});
        let v = chat_ok(&server, &second).await;
        let expected = "Tool results: 4 degrees and snowing; error: the clock service is down.";
        assert_eq!(
            v["choices"][0]["message"]["content"], expected,
            "{model}: {v}"
        );
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
        assert!(v["choices"][0]["message"]
            .get("tool_calls")
            .is_none_or(Value::is_null));

        let sent = last_received(&up);
        let (id0, id1) = (calls[0]["id"].clone(), calls[1]["id"].clone());
        if is_anthropic(model) {
            assert_eq!(sent["system"], "answer briefly", "{sent}");
            let input = |c: &Value| -> Value {
                serde_json::from_str(c["function"]["arguments"].as_str().unwrap()).unwrap()
            };
            assert_eq!(
                anthropic_blocks(&sent["messages"]),
                json!([
                    {"role": "user", "content": [{"type": "text", "text": prompt}]},
                    {"role": "assistant", "content": [
                        {"type": "tool_use", "id": id0, "name": "get_weather", "input": input(&calls[0])},
                        {"type": "tool_use", "id": id1, "name": "get_time", "input": input(&calls[1])},
                    ]},
                    // Both results in one user turn.
                    {"role": "user", "content": [
                        {"type": "tool_result", "tool_use_id": id0, "content": "4 degrees and snowing"},
                        {"type": "tool_result", "tool_use_id": id1, "content": "error: the clock service is down"},
                    ]},
                ]),
                "{sent}"
            );
        } else {
            let msgs = sent["messages"].as_array().unwrap();
            assert_eq!(msgs.len(), 5, "{sent}");
            assert!(
                ["system", "developer"].contains(&msgs[0]["role"].as_str().unwrap()),
                "{sent}"
            );
            assert_eq!(msgs[0]["content"], "answer briefly");
            assert_eq!(msgs[2]["role"], "assistant");
            assert_eq!(msgs[2]["content"], Value::Null, "{sent}");
            assert_eq!(msgs[2]["tool_calls"], assistant["tool_calls"], "{sent}");
            assert_eq!(
                msgs[3],
                json!({"role": "tool", "tool_call_id": id0, "content": "4 degrees and snowing"})
            );
            assert_eq!(
                msgs[4],
                json!({"role": "tool", "tool_call_id": id1, "content": parts})
            );
        }

        // The same answer streamed.
        let mut streamed = second.clone();
        streamed["stream"] = json!(true);
        let got = assemble(&stream_chunks(&server, &streamed).await);
        assert_eq!(got.text, expected, "{model}");
        assert_eq!(got.finishes, ["stop"]);
        assert!(got.calls.is_empty());
    }
}

// ---------------------------------------------------------------------------------------------
// 4. tool_choice.

#[tokio::test]
async fn tool_choice_none_required_and_named() {
    let (up, server) = start();
    for model in MODELS {
        // none: no call, even when the prompt asks the mock for one.
        let body = json!({"model": model, "tools": tools(), "tool_choice": "none",
                          "messages": [{"role": "user", "content": "hello [[mock:tool]]"}]});
        let v = chat_ok(&server, &body).await;
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{model}: {v}");
        assert!(
            v["choices"][0]["message"]["content"]
                .as_str()
                .is_some_and(|t| !t.is_empty()),
            "{v}"
        );
        assert!(v["choices"][0]["message"]
            .get("tool_calls")
            .is_none_or(Value::is_null));
        let sent = last_received(&up);
        if is_anthropic(model) {
            assert_eq!(sent["tool_choice"], json!({"type": "none"}), "{sent}");
        } else {
            assert_eq!(sent["tool_choice"], "none", "{sent}");
        }

        // required: a call without any directive (the first tool); no parallel calls asked.
        let text = "anything at all";
        let body = json!({"model": model, "tools": tools(), "tool_choice": "required",
                          "parallel_tool_calls": false,
                          "messages": [{"role": "user", "content": text}]});
        let v = chat_ok(&server, &body).await;
        assert_eq!(
            v["choices"][0]["finish_reason"], "tool_calls",
            "{model}: {v}"
        );
        let calls = v["choices"][0]["message"]["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 1, "{v}");
        let (id, name, args) = call_of(&calls[0]);
        assert_eq!(name, "get_weather");
        assert_eq!(args, args_for("get_weather", text));
        assert_eq!(
            vec![id],
            expected_ids(model, text, &tools(), MockChoice::Required)
        );
        let sent = last_received(&up);
        if is_anthropic(model) {
            assert_eq!(
                sent["tool_choice"],
                json!({"type": "any", "disable_parallel_tool_use": true}),
                "{sent}"
            );
        } else {
            assert_eq!(sent["tool_choice"], "required", "{sent}");
            assert_eq!(sent["parallel_tool_calls"], false, "{sent}");
        }

        // named: that tool, and no other.
        let text = "what time is it in Tokyo";
        let choice = json!({"type": "function", "function": {"name": "get_time"}});
        let body = json!({"model": model, "tools": tools(), "tool_choice": choice,
                          "messages": [{"role": "user", "content": text}]});
        let v = chat_ok(&server, &body).await;
        assert_eq!(
            v["choices"][0]["finish_reason"], "tool_calls",
            "{model}: {v}"
        );
        let calls = v["choices"][0]["message"]["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 1, "{v}");
        let (id, name, args) = call_of(&calls[0]);
        assert_eq!(name, "get_time");
        assert_eq!(args, args_for("get_time", text));
        assert_eq!(
            vec![id],
            expected_ids(model, text, &tools(), MockChoice::Named("get_time".into()))
        );
        let sent = last_received(&up);
        if is_anthropic(model) {
            assert_eq!(
                sent["tool_choice"],
                json!({"type": "tool", "name": "get_time"}),
                "{sent}"
            );
        } else {
            assert_eq!(sent["tool_choice"], choice, "{sent}");
        }

        // Choices that cannot be honoured are refused before any upstream call.
        let before = up.requests();
        let unknown = json!({"type": "function", "function": {"name": "get_stock"}});
        let body = json!({"model": model, "tools": tools(), "tool_choice": unknown,
                          "messages": [{"role": "user", "content": "x"}]});
        let msg = bad_request(&server, &body).await;
        assert!(msg.contains("get_stock"), "{msg}");
        let body = json!({"model": model, "tool_choice": "required",
                          "messages": [{"role": "user", "content": "x"}]});
        bad_request(&server, &body).await;
        assert_eq!(up.requests(), before);
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Images.

#[tokio::test]
async fn image_parts_reach_both_kinds() {
    let (up, server) = start();
    let data = png_base64(64, 32);
    let data_url = format!("data:image/png;base64,{data}");
    for model in MODELS {
        // One https image.
        let parts = json!([
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        ]);
        let body = json!({"model": model, "messages": [{"role": "user", "content": parts}]});
        let v = chat_ok(&server, &body).await;
        let text = v["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(text.starts_with("I see 1 image. "), "{model}: {text}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        let sent = last_received(&up);
        if is_anthropic(model) {
            assert_eq!(
                sent["messages"][0]["content"],
                json!([
                    {"type": "text", "text": "what is this?"},
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}},
                ]),
                "{sent}"
            );
        } else {
            assert_eq!(sent["messages"][0]["content"], parts, "{sent}");
        }

        // A data: PNG and a low-detail https image.
        let parts = json!([
            {"type": "text", "text": "compare these"},
            {"type": "image_url", "image_url": {"url": data_url}},
            {"type": "image_url", "image_url": {"url": "https://example.com/dog.jpg", "detail": "low"}},
        ]);
        let body = json!({"model": model, "stream": true,
                          "messages": [{"role": "user", "content": parts}]});
        let got = assemble(&stream_chunks(&server, &body).await);
        assert!(
            got.text.starts_with("I see 2 images. "),
            "{model}: {}",
            got.text
        );
        assert_eq!(got.finishes, ["stop"]);
        let sent = last_received(&up);
        if is_anthropic(model) {
            assert_eq!(
                sent["messages"][0]["content"],
                json!([
                    {"type": "text", "text": "compare these"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}},
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/dog.jpg"}},
                ]),
                "{sent}"
            );
        } else {
            assert_eq!(sent["messages"][0]["content"], parts, "{sent}");
        }
    }

    // A data: image type Anthropic does not take is refused there, before any upstream call.
    let before = up.requests();
    let bmp = json!([
        {"type": "text", "text": "and this?"},
        {"type": "image_url", "image_url": {"url": "data:image/bmp;base64,Qk0eAAAAAAAAABoAAAAMAAAA"}},
    ]);
    let body = json!({"model": "claude", "messages": [{"role": "user", "content": bmp}]});
    let msg = bad_request(&server, &body).await;
    assert!(msg.contains("image/bmp"), "{msg}");
    assert_eq!(up.requests(), before);
}

#[tokio::test]
async fn image_prompt_tokens_count_the_image() {
    let (_up, server) = start();
    let data_url = format!("data:image/png;base64,{}", png_base64(1024, 1024));
    for model in MODELS {
        let prompt = |with_image: bool| {
            let mut parts = vec![json!({"type": "text", "text": "describe the picture"})];
            if with_image {
                parts.push(json!({"type": "image_url", "image_url": {"url": data_url}}));
            }
            json!({"model": model, "messages": [{"role": "user", "content": parts}]})
        };
        let without = chat_ok(&server, &prompt(false)).await;
        let with = chat_ok(&server, &prompt(true)).await;
        let tokens = |v: &Value| v["usage"]["prompt_tokens"].as_u64().unwrap();
        assert!(
            tokens(&with) >= tokens(&without) + 85,
            "{model}: a 1024×1024 image should add at least 85 prompt tokens (OpenAI prices it \
             765): {} with, {} without",
            tokens(&with),
            tokens(&without)
        );
    }
}

/// parley's own count of a request prices its images as OpenAI does (85 for `low`, 85 + 170 a
/// tile from a `data:` image's real size, the `high` maximum of 1445 when the size is unknown):
/// seen through admission, which charges a key's daily token budget prompt + max tokens before
/// anything is sent. Each request gets a fresh key with 600 tokens a day, so what earlier
/// replies really used (an upstream prices images its own way) does not matter.
#[tokio::test]
async fn images_are_priced_at_admission() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start_with_admin(both_routes(&up));
    let big = format!("data:image/png;base64,{}", png_base64(1024, 1024));
    let small = format!("data:image/png;base64,{}", png_base64(64, 32));
    let image = |url: &str, detail: Option<&str>| {
        let mut img = json!({"type": "image_url", "image_url": {"url": url}});
        if let Some(d) = detail {
            img["image_url"]["detail"] = json!(d);
        }
        Some(img)
    };
    let mut n = 0;
    for model in MODELS {
        let ask = |image: Option<Value>| {
            let mut parts = vec![json!({"type": "text", "text": "describe the picture"})];
            parts.extend(image);
            json!({"model": model, "max_completion_tokens": 20,
                   "messages": [{"role": "user", "content": parts}]})
        };
        // Text, a low-detail 1024² image (85), a 64×32 one (255): each fits in 600.
        // A 1024² image at high detail (765) and an https image of unknown size (1445) do not,
        // and never reach the upstream.
        for (body, fits) in [
            (ask(None), true),
            (ask(image(&big, Some("low"))), true),
            (ask(image(&small, None)), true),
            (ask(image(&big, None)), false),
            (
                ask(image("https://example.com/huge.png", Some("high"))),
                false,
            ),
        ] {
            n += 1;
            let (_, key) = server
                .create_key(json!({"tenant": format!("img-{n}"), "daily_tokens": 600}))
                .await;
            let before = up.requests();
            let resp = http()
                .post(server.url("/v1/chat/completions"))
                .bearer_auth(&key)
                .json(&body)
                .send()
                .await
                .unwrap();
            if fits {
                let status = resp.status();
                assert_eq!(status, 200, "{model}: {body}: {:?}", resp.text().await);
                assert_eq!(up.requests(), before + 1);
            } else {
                let err = expect_error(resp, 429, "quota_exceeded").await;
                let msg = err["error"]["message"].as_str().unwrap();
                assert!(msg.contains("daily"), "{model}: {err}");
                assert_eq!(up.requests(), before, "{model}: {body}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 6. Structured output.

#[tokio::test]
async fn json_schema_answers_are_json_on_both_kinds() {
    let (up, server) = start();
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "mood": {"type": "string", "enum": ["happy", "sad"]},
            "verified": {"type": "boolean"},
        },
        "required": ["name", "age", "tags", "mood", "verified"],
        "additionalProperties": false,
    });
    let format = json!({"type": "json_schema",
                        "json_schema": {"name": "person", "schema": schema, "strict": true}});
    let expected = json!({"name": "tell me about Alice", "age": 1, "tags": [], "mood": "happy",
                          "verified": true});
    for model in MODELS {
        let body = json!({"model": model, "response_format": format,
                          "messages": [{"role": "user", "content": "tell me about Alice"}]});
        let v = chat_ok(&server, &body).await;
        let content = v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_else(|| panic!("{model}: no content: {v}"));
        let parsed: Value = serde_json::from_str(content)
            .unwrap_or_else(|e| panic!("{model}: content is not JSON ({e}): {content}"));
        assert_eq!(parsed, expected, "{model}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{model}: {v}");
        assert!(
            v["choices"][0]["message"]
                .get("tool_calls")
                .is_none_or(Value::is_null),
            "{v}"
        );

        let sent = last_received(&up);
        if is_anthropic(model) {
            assert!(sent.get("response_format").is_none(), "{sent}");
            let tools = sent["tools"].as_array().unwrap();
            assert_eq!(tools.len(), 1, "{sent}");
            assert_eq!(tools[0]["name"], "json_answer");
            assert_eq!(tools[0]["input_schema"], schema, "{sent}");
            assert_eq!(
                sent["tool_choice"],
                json!({"type": "tool", "name": "json_answer"})
            );
        } else {
            assert_eq!(sent["response_format"], format, "{sent}");
        }

        // Streamed: the pieces make the same JSON.
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let got = assemble(&stream_chunks(&server, &streamed).await);
        let parsed: Value = serde_json::from_str(&got.text).unwrap_or_else(|e| {
            panic!("{model}: streamed content is not JSON ({e}): {}", got.text)
        });
        assert_eq!(parsed, expected, "{model}");
        assert_eq!(got.finishes, ["stop"], "{model}");
        assert!(got.calls.is_empty(), "{model}: {:?}", got.calls);

        // A text format is no format: no answer tool, plain words.
        let body = json!({"model": model, "response_format": {"type": "text"},
                          "messages": [{"role": "user", "content": "just talk"}]});
        let v = chat_ok(&server, &body).await;
        assert_eq!(
            v["choices"][0]["message"]["content"],
            mock_reply(0, &[("user", "just talk")]).as_str(),
            "{model}: {v}"
        );
        let sent = last_received(&up);
        assert!(sent.get("tools").is_none(), "{model}: {sent}");

        // json_object: a JSON object too.
        let body = json!({"model": model, "response_format": {"type": "json_object"},
                          "messages": [{"role": "user", "content": "answer in JSON"}]});
        let v = chat_ok(&server, &body).await;
        let content = v["choices"][0]["message"]["content"].as_str().unwrap();
        let parsed: Value = serde_json::from_str(content).unwrap_or_else(|e| {
            panic!("{model}: json_object content is not JSON ({e}): {content}")
        });
        assert!(parsed.is_object(), "{model}: {content}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{model}: {v}");
    }
}

// ---------------------------------------------------------------------------------------------
// 7. Parameters.

#[tokio::test]
async fn openai_targets_get_every_parameter_verbatim() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let mut cfg = both_routes(&up);
    let mut lax = route("up-lax", &[("up", "mock-1")]);
    lax.drop_unsupported = vec!["n".into()];
    cfg.routes.push(lax);
    let server = TestServer::start(cfg);
    let body = json!({
        "model": "up",
        "messages": [{"role": "user", "content": "parameters please"}],
        "seed": 42,
        "stop": ["END", "STOP"],
        "top_p": 0.5,
        "temperature": 0.25,
        "user": "user-1234",
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "logit_bias": {"50256": -100},
        "metadata": {"purpose": "test"},
        "max_completion_tokens": 500,
        "service_tier": "flex",
        "prediction": {"type": "content", "content": "abc"},
    });
    let v = chat_ok(&server, &body).await;
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    let sent = last_received(&up);
    for key in [
        "seed",
        "stop",
        "top_p",
        "temperature",
        "user",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "metadata",
        "service_tier",
        "prediction",
    ] {
        assert_eq!(sent[key], body[key], "{key}: {sent}");
    }
    assert!(
        sent["max_completion_tokens"] == 500 || sent["max_tokens"] == 500,
        "{sent}"
    );
    // One stop string is still a stop.
    let body = json!({"model": "up", "stop": "END",
                      "messages": [{"role": "user", "content": "one stop"}]});
    chat_ok(&server, &body).await;
    let sent = last_received(&up);
    assert!(
        sent["stop"] == "END" || sent["stop"] == json!(["END"]),
        "{sent}"
    );
    // n: 1 is fine; n: 2 is refused naming n.
    let body = json!({"model": "up", "n": 1, "messages": [{"role": "user", "content": "n one"}]});
    chat_ok(&server, &body).await;
    let before = up.requests();
    let body = json!({"model": "up", "n": 2, "messages": [{"role": "user", "content": "n two"}]});
    let msg = bad_request(&server, &body).await;
    assert!(msg.starts_with("n"), "{msg}");
    assert_eq!(up.requests(), before);
    // A route that allows dropping n answers one choice, and n is not sent upstream.
    let body =
        json!({"model": "up-lax", "n": 2, "messages": [{"role": "user", "content": "n two"}]});
    let v = chat_ok(&server, &body).await;
    assert_eq!(v["choices"].as_array().unwrap().len(), 1, "{v}");
    let sent = last_received(&up);
    assert!(
        sent.get("n").is_none_or(|n| n == 1),
        "a dropped n went upstream: {sent}"
    );
}

#[tokio::test]
async fn anthropic_targets_refuse_what_they_cannot_honour() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let mut cfg = both_routes(&up);
    let mut lax = route("claude-lax", &[("anth", "claude-test")]);
    lax.drop_unsupported = vec!["seed".into(), "service_tier".into(), "logprobs".into()];
    cfg.routes.push(lax);
    let server = TestServer::start(cfg);
    let msgs = json!([{"role": "user", "content": "careful now"}]);

    for (param, value) in [
        ("seed", json!(7)),
        ("presence_penalty", json!(0.5)),
        ("frequency_penalty", json!(0.5)),
        ("logit_bias", json!({"50256": -100})),
        ("logprobs", json!(true)),
        ("top_logprobs", json!(2)),
        ("metadata", json!({"purpose": "test"})),
        ("service_tier", json!("flex")),
    ] {
        let mut body = json!({"model": "claude", "messages": msgs});
        body[param] = value;
        let err = expect_error(chat(&server, &body).await, 400, "bad_request").await;
        let msg = err["error"]["message"].as_str().unwrap();
        assert!(msg.starts_with(param), "{param}: {err}");
        assert_eq!(err["error"]["type"], "invalid_request_error");
        // Streaming is refused the same way, before any byte.
        body["stream"] = json!(true);
        let streamed = expect_error(chat(&server, &body).await, 400, "bad_request").await;
        assert_eq!(streamed, err, "{param}");
    }
    let body = json!({"model": "claude", "n": 2, "messages": msgs});
    let msg = bad_request(&server, &body).await;
    assert!(msg.starts_with("n"), "{msg}");
    assert_eq!(up.requests(), 0, "nothing refused reached the upstream");

    // The route that allows dropping them: accepted, and upstream never sees them.
    let body = json!({"model": "claude-lax", "messages": msgs, "seed": 7,
                      "service_tier": "flex", "logprobs": true,
                      "stop": ["END"], "top_p": 0.9, "user": "user-1234",
                      "max_completion_tokens": 300});
    let v = chat_ok(&server, &body).await;
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    assert_eq!(up.requests(), 1);
    let sent = last_received(&up);
    for dropped in ["seed", "service_tier", "logprobs", "stop", "n"] {
        assert!(
            sent.get(dropped).is_none(),
            "{dropped} went upstream: {sent}"
        );
    }
    assert_eq!(sent["stop_sequences"], json!(["END"]), "{sent}");
    assert_eq!(sent["top_p"], 0.9, "{sent}");
    assert_eq!(sent["max_tokens"], 300, "{sent}");
    assert_eq!(sent["metadata"], json!({"user_id": "user-1234"}), "{sent}");
    // A parameter the lax route does not list is still refused there.
    let body = json!({"model": "claude-lax", "messages": msgs, "presence_penalty": 1.0});
    let msg = bad_request(&server, &body).await;
    assert!(msg.starts_with("presence_penalty"), "{msg}");

    // stop and top_p on the strict route are fine: Anthropic has them.
    let body = json!({"model": "claude", "messages": msgs, "stop": "END", "top_p": 0.5});
    chat_ok(&server, &body).await;
    let sent = last_received(&up);
    assert_eq!(sent["stop_sequences"], json!(["END"]), "{sent}");
    assert_eq!(sent["top_p"], 0.5, "{sent}");
}

// ---------------------------------------------------------------------------------------------
// 8. Malformed requests.

#[tokio::test]
async fn malformed_parts_and_roles_are_refused_naming_the_field() {
    let (up, server) = start();
    let ok_user = || json!({"role": "user", "content": "hi"});
    let cases: Vec<(Value, &str)> = vec![
        (
            json!([{"role": "user", "content": [
                {"type": "text", "text": "listen"},
                {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
            ]}]),
            "messages[0].content[1]",
        ),
        (
            json!([ok_user(), {"role": "assistant", "content": "ok"}, {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "ftp://example.com/a.png"}},
            ]}]),
            "messages[2].content[0]",
        ),
        (
            json!([{"role": "user", "content": [
                {"type": "text", "text": "see"},
                {"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}},
            ]}]),
            "messages[0].content[1]",
        ),
        (
            json!([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
            "messages[0].content[0]",
        ),
        (
            json!([{"role": "user", "content": [{"text": "no type"}]}]),
            "messages[0].content[0]",
        ),
        (
            json!([ok_user(), {"role": "wizard", "content": "hi"}]),
            "messages[1].role",
        ),
        (
            json!([ok_user(), {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
                {"role": "tool", "content": "noon"}]),
            "messages[2].tool_call_id",
        ),
        (
            json!([{"role": "user", "content": "x", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]}]),
            "messages[0].tool_calls",
        ),
        (
            json!([ok_user(), {"role": "assistant", "content": [
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]),
            "messages[1].content",
        ),
    ];
    // Every case is refused; the messages that do not name their field are listed at the end.
    let mut unnamed = Vec::new();
    for model in MODELS {
        for (messages, field) in &cases {
            for stream in [false, true] {
                let body = json!({"model": model, "stream": stream, "messages": messages});
                let msg = bad_request(&server, &body).await;
                if !msg.contains(field) {
                    unnamed.push(format!(
                        "{model} stream={stream}: expected {field} in {msg:?} for {messages}"
                    ));
                }
            }
        }
        let body = json!({"model": model, "messages": [ok_user()],
                          "tools": [{"type": "code_interpreter", "function": {"name": "f"}}]});
        let msg = bad_request(&server, &body).await;
        assert!(msg.contains("tools[0].type"), "{msg}");
    }
    // Anthropic takes a call's arguments as a JSON object: other arguments are refused there.
    for args in ["not json", "[1, 2]"] {
        let body = json!({"model": "claude", "tools": tools(), "messages": [
            ok_user(),
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_x", "type": "function", "function": {"name": "get_time", "arguments": args}}]},
            {"role": "tool", "tool_call_id": "call_x", "content": "noon"},
        ]});
        let msg = bad_request(&server, &body).await;
        assert!(msg.contains("call_x"), "{args}: {msg}");
    }
    assert_eq!(up.requests(), 0);

    // The server keeps serving.
    for model in MODELS {
        let body =
            json!({"model": model, "messages": [{"role": "user", "content": "still there?"}]});
        let v = chat_ok(&server, &body).await;
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    }
    assert_eq!(up.requests(), 2);
    assert!(
        unnamed.is_empty(),
        "refusals that do not name the field:\n{}",
        unnamed.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// 9. The cache stays away.

#[tokio::test]
async fn the_cache_never_serves_tools_results_images_or_schemas() {
    let (up, server) = start();
    for model in MODELS {
        let data_url = format!("data:image/png;base64,{}", png_base64(8, 8));
        let first = json!({"model": model, "tools": tools(),
                           "messages": [{"role": "user", "content": "weather in Rome [[mock:tool]]"}]});
        let v = chat_ok(&server, &first).await;
        let assistant = v["choices"][0]["message"].clone();
        let call_id = assistant["tool_calls"][0]["id"].clone();
        let requests = [
            // Tools offered, no call made.
            json!({"model": model, "tools": tools(),
                   "messages": [{"role": "user", "content": "what is the capital of Italy?"}]}),
            // Tools offered and called.
            first.clone(),
            // Tool results.
            json!({"model": model, "tools": tools(), "messages": [
                {"role": "user", "content": "weather in Rome [[mock:tool]]"}, assistant,
                {"role": "tool", "tool_call_id": call_id, "content": "sunny"}]}),
            // An image.
            json!({"model": model, "messages": [{"role": "user", "content": [
                {"type": "text", "text": "what is in this picture?"},
                {"type": "image_url", "image_url": {"url": data_url}}]}]}),
            // A structured answer.
            json!({"model": model, "response_format": {"type": "json_schema", "json_schema":
                    {"name": "capital", "schema": {"type": "object", "properties": {"city": {"type": "string"}}}}},
                   "messages": [{"role": "user", "content": "what is the capital of Spain?"}]}),
            json!({"model": model, "response_format": {"type": "json_object"},
                   "messages": [{"role": "user", "content": "what is the capital of Greece?"}]}),
        ];
        for body in &requests {
            for round in 0..2 {
                let before = up.requests();
                let v = chat_ok(&server, body).await;
                assert_eq!(
                    up.requests(),
                    before + 1,
                    "{model}: round {round} of {body} did not reach the upstream: {v}"
                );
            }
        }
    }
    let admin = get_json(&server, "/admin/cache").await;
    assert_eq!(admin["entries"], 0, "nothing was stored: {admin}");

    // The cache itself works: a plain question is stored, and the repeat is a hit.
    let plain = json!({"model": "up", "messages": [{"role": "user", "content": "what is the capital of Peru?"}]});
    chat_ok(&server, &plain).await;
    let end = std::time::Instant::now() + TIMEOUT;
    loop {
        let entries = get_json(&server, "/admin/cache").await["entries"].clone();
        if entries == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < end,
            "the plain answer was not stored: {entries}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let before = up.requests();
    chat_ok(&server, &plain).await;
    assert_eq!(up.requests(), before, "the plain repeat is a cache hit");
}

// ---------------------------------------------------------------------------------------------
// 10. The official OpenAI Python SDK.

const SDK_TOOLS_SCRIPT: &str = r#"
import base64, json, os, struct, sys, zlib
import openai
from pydantic import BaseModel

client = openai.OpenAI(base_url=f"http://{sys.argv[1]}/v1", api_key=os.environ["PARLEY_TEST_KEY"], max_retries=0, timeout=10)
tools = json.loads(sys.argv[2])
schema = json.loads(sys.argv[3])

def png(w, h):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xffffffff)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")

png_url = "data:image/png;base64," + base64.b64encode(png(64, 48)).decode()

class Person(BaseModel):
    name: str
    age: int

def call(c):
    return {"id": c.id, "type": c.type, "name": c.function.name, "arguments": json.loads(c.function.arguments)}

out = {}
for model in ["up", "claude"]:
    o = {}
    question = [{"role": "user", "content": "Paris right now [[mock:tools=2]]"}]

    r = client.chat.completions.create(model=model, messages=question, tools=tools)
    m = r.choices[0].message
    o["finish"] = r.choices[0].finish_reason
    o["content"] = m.content
    o["calls"] = [call(c) for c in m.tool_calls or []]

    calls, finishes, text, usage = {}, [], "", None
    stream = client.chat.completions.create(model=model, messages=question, tools=tools, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage.completion_tokens
        for ch in chunk.choices:
            if ch.finish_reason:
                finishes.append(ch.finish_reason)
            if ch.delta.content:
                text += ch.delta.content
            for tc in ch.delta.tool_calls or []:
                slot = calls.setdefault(tc.index, {"id": None, "type": None, "name": "", "arguments": ""})
                if tc.id:
                    slot["id"] = tc.id
                if tc.type:
                    slot["type"] = tc.type
                if tc.function and tc.function.name:
                    slot["name"] += tc.function.name
                if tc.function and tc.function.arguments:
                    slot["arguments"] += tc.function.arguments
    o["stream_calls"] = [dict(calls[i], arguments=json.loads(calls[i]["arguments"])) for i in sorted(calls)]
    o["stream_finish"] = finishes
    o["stream_text"] = text
    o["stream_usage"] = usage

    # The loop, the way the SDK's docs write it: the message object goes back as it came.
    results = ["12 degrees and cloudy", "error: no clock"]
    messages = question + [m] + [
        {"role": "tool", "tool_call_id": c.id, "content": res} for c, res in zip(m.tool_calls, results)
    ]
    r = client.chat.completions.create(model=model, messages=messages, tools=tools)
    o["loop_content"] = r.choices[0].message.content
    o["loop_finish"] = r.choices[0].finish_reason

    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": [
        {"type": "text", "text": "what are these?"},
        {"type": "image_url", "image_url": {"url": png_url}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg", "detail": "low"}},
    ]}])
    o["image_content"] = r.choices[0].message.content

    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "describe Alice"}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}})
    o["json"] = json.loads(r.choices[0].message.content)
    o["json_finish"] = r.choices[0].finish_reason

    r = client.chat.completions.parse(model=model, messages=[{"role": "user", "content": "describe Bob"}], response_format=Person)
    o["parsed"] = r.choices[0].message.parsed.model_dump()

    try:
        client.chat.completions.create(model=model, messages=question, n=2)
        o["n2"] = None
    except openai.BadRequestError as e:
        o["n2"] = {"status": e.status_code, "code": e.code, "type": e.type}
    out[model] = o

print(json.dumps(out))
"#;

#[tokio::test]
async fn official_python_sdk_tools_images_and_schemas() {
    let (ok, _, err) = python(vec!["-c".into(), "import openai".into()], vec![]).await;
    assert!(
        ok,
        "the official OpenAI Python SDK is not importable; run `pip install openai` (scripts/test.sh does):\n{err}"
    );
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start_with_admin(both_routes(&up));
    let (_, key) = server.create_key(json!({"tenant": "sdk-tools"})).await;
    let schema = json!({
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                       "languages": {"type": "array", "items": {"type": "string"}}},
        "required": ["name", "age", "languages"],
        "additionalProperties": false,
    });
    let (ok, stdout, stderr) = python(
        vec![
            "-c".into(),
            SDK_TOOLS_SCRIPT.into(),
            server.addr.to_string(),
            tools().to_string(),
            schema.to_string(),
        ],
        vec![("PARLEY_TEST_KEY".into(), key)],
    )
    .await;
    assert!(ok, "the SDK script failed:\n{stderr}\n{stdout}");
    let out: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("SDK output is not JSON ({e}): {stdout}\n{stderr}"));

    let prompt = "Paris right now [[mock:tools=2]]";
    for model in MODELS {
        let o = &out[model];
        let ids = expected_ids(model, prompt, &tools(), MockChoice::Auto);
        let calls = json!([
            {"id": ids[0], "type": "function", "name": "get_weather",
             "arguments": args_for("get_weather", "Paris right now")},
            {"id": ids[1], "type": "function", "name": "get_time",
             "arguments": args_for("get_time", "Paris right now")},
        ]);
        assert_eq!(o["finish"], "tool_calls", "{model}: {o}");
        assert_eq!(o["content"], Value::Null, "{model}: {o}");
        assert_eq!(o["calls"], calls, "{model}: {o}");
        assert_eq!(o["stream_calls"], calls, "{model}: {o}");
        assert_eq!(o["stream_finish"], json!(["tool_calls"]), "{model}: {o}");
        assert_eq!(o["stream_text"], "", "{model}: {o}");
        assert!(
            o["stream_usage"].as_u64().is_some_and(|n| n > 0),
            "{model}: {o}"
        );
        assert_eq!(
            o["loop_content"], "Tool results: 12 degrees and cloudy; error: no clock.",
            "{model}: {o}"
        );
        assert_eq!(o["loop_finish"], "stop", "{model}: {o}");
        assert!(
            o["image_content"]
                .as_str()
                .is_some_and(|t| t.starts_with("I see 2 images. ")),
            "{model}: {o}"
        );
        assert_eq!(
            o["json"],
            json!({"name": "describe Alice", "age": 1, "languages": []}),
            "{model}: {o}"
        );
        assert_eq!(o["json_finish"], "stop", "{model}: {o}");
        assert_eq!(
            o["parsed"],
            json!({"name": "describe Bob", "age": 1}),
            "{model}: {o}"
        );
        assert_eq!(
            o["n2"],
            json!({"status": 400, "code": "bad_request", "type": "invalid_request_error"}),
            "{model}: {o}"
        );
    }
}
