//! Tests of the OpenAI wire: reading requests, the 400s, answers and stream events.

use serde_json::{json, Value};

use super::super::{bad_request_body, Wire};
use super::*;
use crate::mock_upstream::generator::plan_request;

fn weather_tool() -> Value {
    json!({"type": "function", "function": {"name": "get_weather", "description": "d",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}})
}

fn calling_body() -> Value {
    json!({"model": "m", "messages": [{"role": "user", "content": "Paris [[mock:tool]]"}],
           "tools": [weather_tool()]})
}

/// The JSON payloads of an SSE stream, without the final `[DONE]`.
fn payloads(events: &[String]) -> Vec<Value> {
    assert_eq!(events.last().map(String::as_str), Some("data: [DONE]\n\n"));
    events[..events.len() - 1]
        .iter()
        .map(|e| {
            let body = e.strip_prefix("data: ").unwrap(); // ok: test
            assert!(body.ends_with("\n\n"));
            serde_json::from_str(body.trim_end()).unwrap() // ok: test
        })
        .collect()
}

#[test]
fn a_plain_request_reads_as_before() {
    let body = json!({"model": "m", "max_tokens": 7, "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "c"},
        {"role": "user", "content": "d"}]});
    let req = read_request(&body).unwrap(); // ok: test
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
    assert_eq!(req.max_tokens, Some(7));
    assert_eq!(req.images, 0);
    assert!(req.tools.is_empty() && req.tool_results.is_empty() && req.json_schema.is_none());
    assert_eq!(req.choice, MockChoice::Auto);
    let with_new_name = json!({"max_completion_tokens": 9, "messages": []});
    assert_eq!(read_request(&with_new_name).unwrap().max_tokens, Some(9)); // ok: test
}

#[test]
fn reads_tools_choice_images_and_format() {
    let mut body = calling_body();
    body["tool_choice"] = json!({"type": "function", "function": {"name": "get_weather"}});
    body["response_format"] = json!({"type": "json_schema",
                                     "json_schema": {"name": "x", "schema": {"type": "object"}, "strict": true}});
    body["messages"] = json!([{"role": "user", "content": [
        {"type": "text", "text": "what"},
        {"type": "image_url", "image_url": {"url": "https://x/a.png", "detail": "low"}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]);
    let req = read_request(&body).unwrap(); // ok: test
    assert_eq!(req.tools.len(), 1);
    assert_eq!(req.tools[0].name, "get_weather");
    assert_eq!(
        req.tools[0].parameters["properties"]["city"]["type"],
        "string"
    );
    assert_eq!(req.choice, MockChoice::Named("get_weather".into()));
    assert_eq!(req.images, 2);
    assert_eq!(req.messages[0].content, "what");
    assert_eq!(req.json_schema, Some(json!({"type": "object"})));
    let choice = |c: Value| read_request(&json!({"tool_choice": c})).map(|r| r.choice);
    assert_eq!(choice(json!("none")), Ok(MockChoice::None));
    assert_eq!(choice(json!("required")), Ok(MockChoice::Required));
    assert_eq!(choice(json!("auto")), Ok(MockChoice::Auto));
    assert!(choice(json!("sometimes")).is_err());
    let format = |f: Value| read_request(&json!({"response_format": f}));
    assert!(format(json!({"type": "json_object"})).unwrap().json_object); // ok: test
    assert!(!format(json!({"type": "text"})).unwrap().json_object); // ok: test
}

#[test]
fn reads_assistant_calls_and_trailing_tool_results() {
    let body = json!({"messages": [
        {"role": "user", "content": "weather in Paris and Rome"},
        {"role": "assistant", "content": null, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
            {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Rome\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "rain"}]}],
        "tools": [weather_tool()]});
    let req = read_request(&body).unwrap(); // ok: test
    assert_eq!(
        req.messages[1].content,
        "get_weather({\"city\":\"Paris\"})\nget_weather({\"city\":\"Rome\"})"
    );
    assert_eq!(
        req.tool_results,
        [("sunny".to_owned(), false), ("rain".to_owned(), false)]
    );
    let plan = plan_request(0, &req);
    assert_eq!(plan.text(), "Tool results: sunny; rain.");
    assert_eq!(plan.finish_reason, "stop");
}

#[test]
fn refuses_what_openai_refuses() {
    let user = |content: Value| json!({"messages": [{"role": "user", "content": content}]});
    let cases = [
        (
            "ftp image",
            user(json!([{"type": "image_url", "image_url": {"url": "ftp://x/a.png"}}])),
        ),
        (
            "image without url",
            user(json!([{"type": "image_url", "image_url": {}}])),
        ),
        (
            "unknown part",
            user(json!([{"type": "input_video", "video": "x"}])),
        ),
        ("untyped part", user(json!([{"text": "x"}]))),
        (
            "tool without id",
            json!({"messages": [{"role": "tool", "content": "x"}]}),
        ),
        (
            "tool with unknown id",
            json!({"messages": [
                {"role": "user", "content": "x"},
                {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                                      "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c9", "content": "x"}]}),
        ),
        (
            "tool before any call",
            json!({"messages": [{"role": "tool", "tool_call_id": "c1", "content": "x"}]}),
        ),
        (
            "tool without function name",
            json!({"messages": [], "tools": [{"type": "function", "function": {"parameters": {}}}]}),
        ),
        (
            "bad response format",
            json!({"response_format": {"type": "yaml"}}),
        ),
    ];
    for (case, body) in cases {
        let err = read_request(&body).expect_err(case); // ok: test
        assert!(err.contains(openai_reason(case)), "{case}: {err}");
    }
    assert_eq!(
        bad_request_body(Wire::OpenAi, "nope"),
        json!({"error": {"message": "nope", "type": "invalid_request_error", "param": null, "code": "400"}})
    );
}

/// What the message of each refusal case must say (so that each fails for its own reason).
fn openai_reason(case: &str) -> &'static str {
    match case {
        "ftp image" => "invalid image URL",
        "image without url" => "image_url.url is required",
        "unknown part" => "unknown content part type \"input_video\"",
        "untyped part" => "unknown content part type",
        "tool without id" => "tool_call_id is required",
        "tool with unknown id" | "tool before any call" => "does not answer any earlier tool call",
        "tool without function name" => "tools[0].function.name is required",
        _ => "response_format.type",
    }
}

#[test]
fn answers_text_and_tool_calls() {
    let text = plan_request(
        0,
        &read_request(&json!({"messages": [{"role": "user", "content": "hi"}]})).unwrap(), // ok: test
    ); // ok: test
    let a = answer(&text, "m");
    assert_eq!(a["choices"][0]["message"]["content"], text.text());
    assert!(a["choices"][0]["message"].get("tool_calls").is_none());
    assert_eq!(a["choices"][0]["finish_reason"], "stop");

    let calls = plan_request(0, &read_request(&calling_body()).unwrap()); // ok: test
    let a = answer(&calls, "m");
    let message = &a["choices"][0]["message"];
    assert_eq!(message["role"], "assistant");
    assert!(message["content"].is_null());
    assert_eq!(a["choices"][0]["finish_reason"], "tool_calls");
    let call = &message["tool_calls"][0];
    assert!(call["id"].as_str().unwrap().starts_with("call_0_")); // ok: test
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    assert_eq!(call["function"]["arguments"], r#"{"city":"Paris"}"#);
    assert_eq!(a["usage"]["completion_tokens"], calls.completion_tokens);
}

#[test]
fn streams_tool_calls_in_fragments() {
    let mut body = calling_body();
    body["messages"][0]["content"] = json!("a long city name here [[mock:tools=2]]");
    body["tools"] = json!([weather_tool(), {"type": "function", "function": {"name": "lookup"}}]);
    let plan = plan_request(0, &read_request(&body).unwrap()); // ok: test
    let events = payloads(&events(&plan, "m", true));
    assert_eq!(
        events[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": null})
    );
    let mut args = [String::new(), String::new()];
    let mut heads = Vec::new();
    for e in &events[1..events.len() - 2] {
        let call = &e["choices"][0]["delta"]["tool_calls"][0];
        let i = call["index"].as_u64().unwrap() as usize; // ok: test
        if let Some(id) = call.get("id") {
            assert_eq!(call["function"]["arguments"], "");
            assert_eq!(call["type"], "function");
            heads.push((
                i,
                id.as_str().unwrap().to_owned(), // ok: test
                call["function"]["name"].clone(),
            )); // ok: test
        } else {
            let frag = call["function"]["arguments"].as_str().unwrap(); // ok: test
            assert!(frag.chars().count() <= 10);
            args[i].push_str(frag);
        }
    }
    assert_eq!(heads.len(), 2);
    for (i, call) in plan.tool_calls.iter().enumerate() {
        assert_eq!(heads[i], (i, call.id.clone(), json!(call.name)));
        assert_eq!(args[i], call.arguments);
    }
    let finish = &events[events.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(
        events[events.len() - 1]["usage"]["completion_tokens"],
        plan.completion_tokens
    );
}

#[test]
fn streams_text_after_one_opening_event() {
    let req =
        read_request(&json!({"messages": [{"role": "user", "content": "hi [[mock:words=3]]"}]}));
    let plan = plan_request(0, &req.unwrap()); // ok: test
    let events = payloads(&events(&plan, "m", false));
    assert_eq!(events.len(), OPENING + 3 + 1);
    assert_eq!(
        events[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    for (i, chunk) in plan.chunks.iter().enumerate() {
        assert_eq!(
            events[i + OPENING]["choices"][0]["delta"]["content"],
            *chunk
        );
    }
    assert_eq!(events[4]["choices"][0]["finish_reason"], "stop");
}
