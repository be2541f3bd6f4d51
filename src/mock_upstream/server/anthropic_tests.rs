//! Tests of the Anthropic wire: reading requests, the 400s, answers and stream events.

use serde_json::{json, Value};

use super::super::{bad_request_body, Wire};
use super::*;
use crate::mock_upstream::generator::plan_request;

fn weather_tool() -> Value {
    json!({"name": "get_weather", "description": "d",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}})
}

fn body(messages: Value) -> Value {
    json!({"model": "m", "max_tokens": 100, "messages": messages, "tools": [weather_tool()]})
}

fn calling_body() -> Value {
    body(json!([{"role": "user", "content": "Paris [[mock:tool]]"}]))
}

/// A conversation that ends with the results of the assistant's two calls.
fn results_body() -> Value {
    body(json!([
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Looking."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Rome"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
            {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": true,
             "content": [{"type": "text", "text": "no "}, {"type": "text", "text": "data"}]}]}]))
}

/// `(event name, payload)` of each SSE event.
fn parse(events: &[String]) -> Vec<(String, Value)> {
    events
        .iter()
        .map(|e| {
            let (name, data) = e.trim_end().split_once('\n').unwrap(); // ok: test
            let name = name.strip_prefix("event: ").unwrap(); // ok: test
            let data: Value = serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap(); // ok: test
            assert_eq!(data["type"], name);
            (name.to_owned(), data)
        })
        .collect()
}

#[test]
fn a_plain_request_reads_as_before() {
    let b = json!({"max_tokens": 5, "system": "be brief", "temperature": 0.2, "top_p": 1,
                   "stop_sequences": ["x"], "metadata": {"user_id": "u"}, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "c"},
        {"role": "user", "content": "d"}]});
    let req = read_request(&b).unwrap(); // ok: test
    let got: Vec<(&str, &str)> = req
        .messages
        .iter()
        .map(|m| (m.role.as_str(), m.content.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("system", "be brief"),
            ("user", "ab"),
            ("assistant", "c"),
            ("user", "d")
        ]
    );
    assert_eq!(req.max_tokens, Some(5));
    assert!(req.tools.is_empty() && req.tool_results.is_empty());
}

#[test]
fn reads_tools_choice_and_images() {
    let mut b = body(json!([{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
        {"type": "image", "source": {"type": "url", "url": "https://x/a.jpg"}},
        {"type": "text", "text": "what is this"}]}]));
    b["tool_choice"] = json!({"type": "tool", "name": "get_weather"});
    let req = read_request(&b).unwrap(); // ok: test
    assert_eq!(req.images, 2);
    assert_eq!(req.messages[0].content, "what is this");
    assert_eq!(req.tools[0].name, "get_weather");
    assert_eq!(req.tools[0].parameters["type"], "object");
    assert_eq!(req.choice, MockChoice::Named("get_weather".into()));
    let choice = |c: Value| {
        let mut b = calling_body();
        b["tool_choice"] = c;
        read_request(&b).map(|r| r.choice)
    };
    assert_eq!(choice(json!({"type": "any"})), Ok(MockChoice::Required));
    assert_eq!(choice(json!({"type": "none"})), Ok(MockChoice::None));
    assert_eq!(choice(json!({"type": "auto"})), Ok(MockChoice::Auto));
}

#[test]
fn reads_tool_results_and_answers_them() {
    let req = read_request(&results_body()).unwrap(); // ok: test
    assert_eq!(
        req.tool_results,
        [("sunny".to_owned(), false), ("no data".to_owned(), true)]
    );
    assert_eq!(
        req.messages[1].content,
        "Looking.\nget_weather({\"city\":\"Paris\"})\nget_weather({\"city\":\"Rome\"})"
    );
    assert_eq!(req.messages.last().map(|m| m.role.as_str()), Some("tool"));
    let plan = plan_request(0, &req);
    assert_eq!(plan.text(), "Tool results: sunny; error: no data.");
    assert_eq!(answer(&plan, "m")["stop_reason"], "end_turn");
    // Results followed by text: the request no longer ends with tool results.
    let mut b = results_body();
    b["messages"][2]["content"]
        .as_array_mut()
        .unwrap() // ok: test
        .push(json!({"type": "text", "text": "and now?"}));
    let req = read_request(&b).unwrap(); // ok: test
    assert!(req.tool_results.is_empty());
    assert_eq!(
        req.messages.last().map(|m| m.content.as_str()),
        Some("and now?")
    );
}

#[test]
fn refuses_what_anthropic_refuses() {
    let user = |content: Value| body(json!([{"role": "user", "content": content}]));
    let image = |source: Value| user(json!([{"type": "image", "source": source}]));
    let with = |key: &str, value: Value| {
        let mut b = calling_body();
        b[key] = value;
        b
    };
    let mut no_max = calling_body();
    no_max.as_object_mut().unwrap().remove("max_tokens"); // ok: test
    let mut unmatched = results_body();
    unmatched["messages"][2]["content"][0]["tool_use_id"] = json!("toolu_9");
    let cases = [
        ("no max_tokens", no_max),
        (
            "system role",
            body(json!([{"role": "system", "content": "x"}, {"role": "user", "content": "y"}])),
        ),
        (
            "tool role",
            body(json!([{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}])),
        ),
        (
            "assistant first",
            body(json!([{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}])),
        ),
        (
            "two users",
            body(json!([{"role": "user", "content": "x"}, {"role": "user", "content": "y"}])),
        ),
        ("no messages", body(json!([]))),
        (
            "openai tool",
            with(
                "tools",
                json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]),
            ),
        ),
        (
            "function wrapper",
            with(
                "tools",
                json!([{"name": "f", "function": {}, "input_schema": {}}]),
            ),
        ),
        ("no input_schema", with("tools", json!([{"name": "f"}]))),
        ("string tool_choice", with("tool_choice", json!("auto"))),
        (
            "unknown tool_choice",
            with("tool_choice", json!({"type": "required"})),
        ),
        (
            "bmp media type",
            image(json!({"type": "base64", "media_type": "image/bmp", "data": "AA"})),
        ),
        (
            "no media type",
            image(json!({"type": "base64", "data": "AA"})),
        ),
        (
            "empty data",
            image(json!({"type": "base64", "media_type": "image/png", "data": ""})),
        ),
        ("url without url", image(json!({"type": "url"}))),
        (
            "openai image part",
            user(json!([{"type": "image_url", "image_url": {"url": "https://x"}}])),
        ),
        ("unmatched tool_use_id", unmatched),
        (
            "result without a previous call",
            user(json!([{"type": "tool_result", "tool_use_id": "toolu_1", "content": "x"}])),
        ),
        (
            "response_format",
            with("response_format", json!({"type": "json_object"})),
        ),
        ("logprobs", with("logprobs", json!(true))),
        ("n", with("n", json!(1))),
        ("frequency_penalty", with("frequency_penalty", json!(0))),
        ("presence_penalty", with("presence_penalty", json!(0))),
        ("seed", with("seed", json!(1))),
        (
            "tool_calls in a message",
            body(json!([{"role": "user", "content": "x"},
                        {"role": "assistant", "content": "", "tool_calls": []}])),
        ),
    ];
    for (case, b) in cases {
        let err = read_request(&b).expect_err(case); // ok: test
        assert!(err.contains(anthropic_reason(case)), "{case}: {err}");
    }
    assert_eq!(
        bad_request_body(Wire::Anthropic, "nope"),
        json!({"type": "error", "error": {"type": "invalid_request_error", "message": "nope"}})
    );
}

/// What the message of each refusal case must say (so that each fails for its own reason).
fn anthropic_reason(case: &str) -> &str {
    match case {
        "no max_tokens" => "max_tokens: Field required",
        "system role" | "tool role" => ".role: Input should be 'user' or 'assistant'",
        "assistant first" => "first message must use the \"user\" role",
        "two users" => "roles must alternate",
        "no messages" => "at least one message",
        "openai tool" | "function wrapper" => "OpenAI-style function tools",
        "no input_schema" => "input_schema: Field required",
        "string tool_choice" => "tool_choice: Input should be an object",
        "unknown tool_choice" => "tool_choice.type",
        "bmp media type" | "no media type" => "source.media_type",
        "empty data" => "source.data",
        "url without url" => "source.url",
        "openai image part" => "\"image_url\" is not allowed",
        "unmatched tool_use_id" | "result without a previous call" => "unexpected `tool_use_id`",
        "tool_calls in a message" => "tool_calls: Extra inputs are not permitted",
        field => field,
    }
}

#[test]
fn answers_text_and_tool_use() {
    let text = plan_request(
        0,
        &read_request(&body(json!([{"role": "user", "content": "hi"}]))).unwrap(), // ok: test
    ); // ok: test
    let a = answer(&text, "m");
    assert_eq!(a["content"], json!([{"type": "text", "text": text.text()}]));
    assert_eq!(a["stop_reason"], "end_turn");

    let calls = plan_request(0, &read_request(&calling_body()).unwrap()); // ok: test
    let a = answer(&calls, "m");
    assert_eq!(a["stop_reason"], "tool_use");
    let content = a["content"].as_array().unwrap(); // ok: test
    assert_eq!(content.len(), 1);
    assert_eq!(content[0]["type"], "tool_use");
    let id = content[0]["id"].as_str().unwrap(); // ok: test
    assert_eq!(id, calls.tool_calls[0].id.replacen("call_", "toolu_", 1));
    assert!(id.starts_with("toolu_0_"));
    assert_eq!(content[0]["name"], "get_weather");
    assert_eq!(content[0]["input"], json!({"city": "Paris"}));
    assert_eq!(a["usage"]["output_tokens"], calls.completion_tokens);
    assert_eq!(call_id("other"), "other");
}

#[test]
fn streams_tool_use_blocks_in_fragments() {
    let mut b =
        body(json!([{"role": "user", "content": "a long city name here [[mock:tools=2]]"}]));
    b["tools"] = json!([weather_tool(), {"name": "lookup", "input_schema": {"type": "object"}}]);
    let plan = plan_request(0, &read_request(&b).unwrap()); // ok: test
    let events = parse(&events(&plan, "m"));
    assert_eq!(events[0].0, "message_start");
    let mut inputs = [String::new(), String::new()];
    let mut starts = Vec::new();
    let mut stops = Vec::new();
    for (name, e) in &events[1..events.len() - 2] {
        let k = e["index"].as_u64().unwrap() as usize; // ok: test
        match name.as_str() {
            "content_block_start" => {
                assert_eq!(e["content_block"]["input"], json!({}));
                starts.push((
                    k,
                    e["content_block"]["id"].clone(),
                    e["content_block"]["name"].clone(),
                ));
            }
            "content_block_delta" => {
                assert_eq!(e["delta"]["type"], "input_json_delta");
                let frag = e["delta"]["partial_json"].as_str().unwrap(); // ok: test
                assert!(frag.chars().count() <= 10);
                inputs[k].push_str(frag);
            }
            "content_block_stop" => stops.push(k),
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(stops, [0, 1]);
    for (k, call) in plan.tool_calls.iter().enumerate() {
        assert_eq!(starts[k], (k, json!(call_id(&call.id)), json!(call.name)));
        assert_eq!(inputs[k], call.arguments);
    }
    let (name, delta) = &events[events.len() - 2];
    assert_eq!(name, "message_delta");
    assert_eq!(delta["delta"]["stop_reason"], "tool_use");
    assert_eq!(delta["usage"]["output_tokens"], plan.completion_tokens);
    assert_eq!(events[events.len() - 1].0, "message_stop");
}

#[test]
fn streams_text_after_two_opening_events() {
    let b = body(json!([{"role": "user", "content": "hi [[mock:words=3]]"}]));
    let plan = plan_request(0, &read_request(&b).unwrap()); // ok: test
    let events = parse(&events(&plan, "m"));
    assert_eq!(events[1].0, "content_block_start");
    for (i, chunk) in plan.chunks.iter().enumerate() {
        let (name, e) = &events[i + OPENING];
        assert_eq!(name, "content_block_delta");
        assert_eq!(e["delta"]["text"], *chunk);
    }
    assert_eq!(events[OPENING + 3].0, "content_block_stop");
    assert_eq!(events[OPENING + 4].1["delta"]["stop_reason"], "end_turn");
    let cut = plan_request(
        0,
        &read_request(&json!({"max_tokens": 2, "messages": [
        {"role": "user", "content": "[[mock:words=40]]"}]}))
        .unwrap(), // ok: test
    ); // ok: test
    assert_eq!(answer(&cut, "m")["stop_reason"], "max_tokens");
}
