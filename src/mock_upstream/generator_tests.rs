//! Tests of the generator: plain replies and directives, tools, results, formats and images.

use serde_json::{json, Value};

use super::*;

fn user(text: &str) -> Vec<MockMessage> {
    vec![msg("user", text)]
}

fn msg(role: &str, content: &str) -> MockMessage {
    MockMessage {
        role: role.into(),
        content: content.into(),
    }
}

fn weather() -> MockTool {
    MockTool {
        name: "get_weather".into(),
        parameters: json!({"type": "object", "properties": {
            "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
            "unit": {"type": "string", "enum": ["c", "f"]}, "tags": {"type": "array"},
            "extra": {"type": "object"}, "ratio": {"type": ["number", "null"]}}}),
    }
}

fn bare(name: &str) -> MockTool {
    MockTool {
        name: name.into(),
        parameters: Value::Null,
    }
}

fn with_tools(text: &str, tools: Vec<MockTool>, choice: MockChoice) -> MockRequest {
    MockRequest {
        messages: user(text),
        tools,
        choice,
        ..MockRequest::default()
    }
}

fn names(p: &Plan) -> Vec<&str> {
    p.tool_calls.iter().map(|c| c.name.as_str()).collect()
}

#[test]
fn deterministic_per_seed_and_request() {
    let a = plan(1, &user("hello"), None);
    assert_eq!(a, plan(1, &user("hello"), None));
    assert_ne!(a.text(), plan(2, &user("hello"), None).text());
    assert_ne!(a.text(), plan(1, &user("hello!"), None).text());
    assert!(a.chunks.len() >= 8);
    assert_eq!(a.finish_reason, "stop");
    assert!(a.tool_calls.is_empty());
}

#[test]
fn plain_replies_are_unchanged() {
    // Pinned: integration tests compare replies across versions of the generator.
    let p = plan(7, &user("hello [[mock:words=3]]"), None);
    assert_eq!(p.chunks, ["zephyr", " jasmine", " cedar."]);
    assert_eq!(
        plan(1, &user("hello"), None).text(),
        "quill summit saffron basil jasmine ripple meadow vista amber zephyr pebble dawn atlas \
         tundra canyon orbit."
    );
    let same = plan_request(
        7,
        &MockRequest {
            messages: user("hello [[mock:words=3]]"),
            tools: vec![weather()],
            ..MockRequest::default()
        },
    );
    // Offering tools without a directive or a forcing choice does not change the words.
    assert_eq!(same.text(), p.text());
}

#[test]
fn directives() {
    let p = plan(0, &user("x [[mock:words=3,drop_after=2,ttft_ms=5]]"), None);
    assert_eq!(p.chunks.len(), 3);
    assert_eq!(p.fault, Some(Fault::DropAfter(2)));
    assert_eq!(p.ttft, Some(Duration::from_millis(5)));
    assert_eq!(
        plan(0, &user("[[mock:status=503]]"), None).fault,
        Some(Fault::Status(503))
    );
    assert_eq!(
        plan(0, &user("[[mock:hang]]"), None).fault,
        Some(Fault::Hang)
    );
    assert!(plan(0, &user("hi [[mock:echo]]"), None)
        .text()
        .starts_with("hi [[mock:echo]] |"));
    // Unterminated or unknown directives are ignored.
    assert_eq!(plan(0, &user("[[mock:status=500"), None).fault, None);
}

#[test]
fn max_tokens_cuts_with_length() {
    let p = plan(0, &user("[[mock:words=50]]"), Some(5));
    assert_eq!(p.finish_reason, "length");
    assert!(p.completion_tokens <= 5 && !p.chunks.is_empty());
}

#[test]
fn tool_directive_calls_with_deterministic_ids_and_args() {
    let req = with_tools(
        "Paris please [[mock:tool]]",
        vec![weather(), bare("other")],
        MockChoice::Auto,
    );
    let p = plan_request(3, &req);
    assert_eq!(p, plan_request(3, &req));
    assert!(p.chunks.is_empty());
    assert_eq!(p.finish_reason, "tool_calls");
    assert_eq!(names(&p), ["get_weather"]);
    let call = &p.tool_calls[0];
    assert!(call.id.starts_with("call_0_") && call.id.len() == "call_0_".len() + 8);
    assert!(call.id["call_0_".len()..]
        .chars()
        .all(|c| c.is_ascii_hexdigit()));
    assert_ne!(call.id, plan_request(4, &req).tool_calls[0].id);
    let args: Value = serde_json::from_str(&call.arguments).unwrap(); // ok: test
    assert_eq!(
        args,
        json!({"city": "Paris please", "days": 1, "metric": true, "unit": "c", "tags": [],
               "extra": {}, "ratio": 1})
    );
    assert_eq!(call.arguments, args.to_string(), "compact JSON");
    let expected = tokens::count(Encoding::Cl100kBase, "get_weather")
        + tokens::count(Encoding::Cl100kBase, &call.arguments);
    assert_eq!(p.completion_tokens, expected);
}

#[test]
fn a_tool_without_properties_gets_the_input() {
    let p = plan_request(
        0,
        &with_tools(
            "  look this up [[mock:tool=other]] ",
            vec![weather(), bare("other")],
            MockChoice::Auto,
        ),
    );
    assert_eq!(names(&p), ["other"]);
    assert_eq!(p.tool_calls[0].arguments, r#"{"input":"look this up"}"#);
}

#[test]
fn tools_n_calls_in_parallel() {
    let tools = vec![weather(), bare("b"), bare("c")];
    let p = plan_request(
        0,
        &with_tools(
            "[[mock:tools=2,ttft_ms=1]]",
            tools.clone(),
            MockChoice::Auto,
        ),
    );
    assert_eq!(names(&p), ["get_weather", "b"]);
    assert!(p.tool_calls[0].id.starts_with("call_0_"));
    assert!(p.tool_calls[1].id.starts_with("call_1_"));
    assert_eq!(p.tool_calls[0].id[7..], p.tool_calls[1].id[7..]);
    assert_eq!(p.ttft, Some(Duration::from_millis(1)));
    let all = plan_request(0, &with_tools("[[mock:tools=9]]", tools, MockChoice::Auto));
    assert_eq!(names(&all), ["get_weather", "b", "c"]);
}

#[test]
fn choice_rules() {
    let tools = || vec![weather(), bare("b")];
    let call =
        |text: &str, choice| names(&plan_request(0, &with_tools(text, tools(), choice))).join(",");
    assert_eq!(call("hi", MockChoice::Auto), "");
    assert_eq!(call("hi", MockChoice::Required), "get_weather");
    assert_eq!(call("hi", MockChoice::Named("b".into())), "b");
    assert_eq!(call("hi", MockChoice::Named("zzz".into())), "");
    assert_eq!(call("hi [[mock:tool]]", MockChoice::None), "");
    assert_eq!(call("hi [[mock:tool]]", MockChoice::Named("b".into())), "b");
    assert_eq!(call("hi [[mock:tool=b]]", MockChoice::Auto), "b");
    assert_eq!(call("hi [[mock:tool=zzz]]", MockChoice::Auto), "");
    assert_eq!(
        call("hi [[mock:tool=zzz]]", MockChoice::Required),
        "get_weather"
    );
    // No tools offered: a directive is a plain text request.
    let p = plan_request(
        0,
        &with_tools("hi [[mock:tool]]", vec![], MockChoice::Required),
    );
    assert_eq!(p.finish_reason, "stop");
    assert!(!p.chunks.is_empty());
}

#[test]
fn tool_results_get_a_results_reply() {
    let req = MockRequest {
        messages: vec![
            msg("user", "weather? [[mock:tool]]"),
            msg("assistant", "get_weather({})"),
            msg("tool", "sunny"),
            msg("tool", "no such city"),
        ],
        tool_results: vec![("sunny".into(), false), ("no such city".into(), true)],
        tools: vec![weather()],
        choice: MockChoice::Required,
        ..MockRequest::default()
    };
    let p = plan_request(0, &req);
    assert!(p.tool_calls.is_empty());
    assert_eq!(p.finish_reason, "stop");
    assert_eq!(p.text(), "Tool results: sunny; error: no such city.");
    assert!(p.chunks.len() > 1);
    let results_tokens = tokens::count(Encoding::Cl100kBase, "sunny");
    let bare = plan_request(
        0,
        &MockRequest {
            messages: req.messages[..3].to_vec(),
            ..MockRequest::default()
        },
    );
    assert!(p.prompt_tokens >= bare.prompt_tokens + results_tokens);
}

#[test]
fn assistant_calls_count_as_prompt_tokens() {
    let call = MockCall {
        id: "call_0_x".into(),
        name: "get_weather".into(),
        arguments: r#"{"city":"Paris"}"#.into(),
    };
    let content = assistant_content("", std::slice::from_ref(&call));
    assert_eq!(content, r#"get_weather({"city":"Paris"})"#);
    assert_eq!(
        assistant_content("let me look", &[call.clone(), call]),
        "let me look\nget_weather({\"city\":\"Paris\"})\nget_weather({\"city\":\"Paris\"})"
    );
    let with = plan(
        0,
        &[
            msg("user", "a"),
            msg("assistant", &content),
            msg("user", "b"),
        ],
        None,
    );
    let without = plan(
        0,
        &[msg("user", "a"), msg("assistant", ""), msg("user", "b")],
        None,
    );
    assert!(with.prompt_tokens > without.prompt_tokens);
}

#[test]
fn json_schema_reply_parses_and_matches_types() {
    let req = MockRequest {
        messages: user("describe [[mock:words=3]]"),
        json_schema: Some(weather().parameters),
        ..MockRequest::default()
    };
    let p = plan_request(0, &req);
    assert_eq!(p.finish_reason, "stop");
    assert!(p.chunks.iter().all(|c| c.chars().count() <= 12));
    assert!(p.chunks.len() > 1);
    let v: Value = serde_json::from_str(&p.text()).unwrap(); // ok: test
    assert!(v["city"].is_string() && v["days"].is_i64() && v["metric"].is_boolean());
    assert!(v["tags"].is_array() && v["extra"].is_object() && v["ratio"].is_number());
    assert_eq!(v["unit"], "c");
    assert_eq!(v["city"], "describe");
    // No schema: the input object.
    let none = plan_request(
        0,
        &MockRequest {
            messages: user("x"),
            json_schema: Some(Value::Null),
            ..MockRequest::default()
        },
    );
    assert_eq!(none.text(), r#"{"input":"x"}"#);
}

#[test]
fn json_object_wraps_the_words() {
    let words = plan(0, &user("hi \"quoted\" [[mock:echo,words=4]]"), None).text();
    let req = MockRequest {
        messages: user("hi \"quoted\" [[mock:echo,words=4]]"),
        json_object: true,
        ..MockRequest::default()
    };
    let p = plan_request(0, &req);
    assert!(p.chunks.iter().all(|c| c.chars().count() <= 12));
    let v: Value = serde_json::from_str(&p.text()).unwrap(); // ok: test
    assert_eq!(v, json!({ "reply": words }));
}

#[test]
fn images_prefix_the_reply() {
    let text = plan(0, &user("what is this"), None).text();
    let one = MockRequest {
        messages: user("what is this"),
        images: 1,
        ..MockRequest::default()
    };
    let p = plan_request(0, &one);
    assert_eq!(p.chunks[0], "I see 1 image.");
    assert_eq!(p.text(), format!("I see 1 image. {text}"));
    let two = plan_request(0, &MockRequest { images: 2, ..one });
    assert_eq!(two.text(), format!("I see 2 images. {text}"));
}

#[test]
fn a_continuation_makes_no_calls() {
    let req = MockRequest {
        messages: vec![msg("user", "x [[mock:tool]]"), msg("assistant", "partial")],
        tools: vec![weather()],
        choice: MockChoice::Required,
        ..MockRequest::default()
    };
    let p = plan_request(0, &req);
    assert!(p.tool_calls.is_empty() && !p.chunks.is_empty());
}

#[test]
fn strip_and_fragments() {
    assert_eq!(
        strip_directives(" a [[mock:tool]] b [[mock:x"),
        "a  b [[mock:x"
    );
    assert_eq!(fragments("héllo wörld", 4), ["héll", "o wö", "rld"]);
    assert!(fragments("", 4).is_empty());
}

#[test]
fn directive_values_out_of_range_are_ignored() {
    // None of these may panic, wait for ever, or ask for unbounded work.
    let p = plan(0, &user("[[mock:tps=1e-300,ttft_ms=99999999999,words=99999999,status=9999,drop_after=99999999]]"), None);
    assert_eq!(p.tokens_per_sec, None);
    assert_eq!(p.ttft, None);
    assert_eq!(p.fault, None);
    assert!(p.chunks.len() < 100, "{}", p.chunks.len());
    assert_eq!(
        plan(0, &user("[[mock:tps=NaN]]"), None).tokens_per_sec,
        None
    );
    assert_eq!(
        plan(0, &user("[[mock:tps=inf]]"), None).tokens_per_sec,
        None
    );
    assert_eq!(pace(0.0), None);
    assert_eq!(pace(2.0), Some(Duration::from_millis(500)));
}

#[test]
fn the_longest_reply_cut_by_max_tokens_stays_within_it() {
    // The most words a prompt may ask for, cut near the end (each chunk is counted once: the
    // whole reply was re-counted after every chunk before, which held a core for a minute).
    let p = plan(0, &user("[[mock:words=20000]]"), Some(19_000));
    assert_eq!(p.finish_reason, "length");
    assert!(
        p.completion_tokens <= 19_000 && p.completion_tokens > 18_000,
        "{}",
        p.completion_tokens
    );
}
