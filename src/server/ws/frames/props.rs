//! Property tests of the client frame decoder: whatever a client sends (any text, any JSON
//! value, frame-shaped objects with fields of any type) is answered with a typed frame or a
//! `bad_request`, never a panic; a valid frame decodes to exactly the fields it was built from.

use proptest::prelude::*;
use serde_json::{json, Map, Value};

use super::*;
use crate::domain::{Content, Part};
use crate::error::ErrorCode;

const TYPES: &[&str] = &[
    "create",
    "update",
    "subscribe",
    "user_message",
    "tool_result",
    "cancel",
];

const FIELDS: &[&str] = &[
    "type",
    "conversation",
    "client_id",
    "content",
    "options",
    "metadata",
    "model",
    "system",
    "prompt",
    "memory",
    "tools",
    "tool_choice",
    "after_seq",
    "tool_call_id",
    "is_error",
];

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 384,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Any JSON value, up to a few levels deep, with keys that are often the frame's own.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        any::<String>().prop_map(Value::String),
        prop::sample::select(TYPES).prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(FIELDS).prop_map(str::to_owned),
        1 => any::<String>(),
    ]
}

/// An object with a known or unknown `type` and frame fields of any type.
fn frame_like() -> impl Strategy<Value = Value> {
    let kind = prop_oneof![
        4 => prop::sample::select(TYPES).prop_map(Value::from),
        1 => json_value(),
    ];
    (kind, prop::collection::vec((key(), json_value()), 0..8)).prop_map(|(kind, fields)| {
        let mut obj: Map<String, Value> = fields.into_iter().collect();
        obj.insert("type".into(), kind);
        Value::Object(obj)
    })
}

fn content() -> impl Strategy<Value = Content> {
    let part = prop_oneof![
        any::<String>().prop_map(|text| Part::Text { text }),
        "[a-z0-9/]{0,20}".prop_map(|path| Part::ImageUrl {
            image_url: crate::domain::ImageUrl {
                url: format!("https://example.test/{path}"),
                detail: None,
            },
        }),
    ];
    prop_oneof![
        any::<String>().prop_map(Content::Text),
        prop::collection::vec(part, 0..4).prop_map(Content::Parts),
    ]
}

/// A refusal is a `bad_request` that says something.
fn is_typed_refusal(bad: &BadFrame) -> bool {
    bad.error.code == ErrorCode::BadRequest && !bad.error.message.is_empty()
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_text_is_decoded_or_refused(text in any::<String>()) {
        if let Err(bad) = decode(&text) {
            prop_assert!(is_typed_refusal(&bad), "{:?}", bad.error);
        }
    }

    #[test]
    fn any_json_value_is_decoded_or_refused(value in json_value()) {
        match decode(&value.to_string()) {
            Ok(_) => prop_assert!(value.get("type").is_some_and(Value::is_string)),
            Err(bad) => prop_assert!(is_typed_refusal(&bad), "{:?}", bad.error),
        }
    }

    #[test]
    fn frame_shaped_objects_are_decoded_or_refused_with_their_ids(value in frame_like()) {
        if let Err(bad) = decode(&value.to_string()) {
            prop_assert!(is_typed_refusal(&bad), "{:?}", bad.error);
            // Whatever ids the frame carried as strings are echoed for the error frame.
            let field = |k: &str| value.get(k).and_then(Value::as_str).map(str::to_owned);
            prop_assert_eq!(bad.client_id, field("client_id"));
            prop_assert_eq!(bad.conversation, field("conversation"));
        }
    }

    #[test]
    fn user_messages_round_trip(
        conversation in any::<String>(),
        client_id in any::<String>(),
        content in content(),
        max_tokens in prop::option::of(any::<u32>()),
    ) {
        let mut frame = json!({"type": "user_message", "conversation": conversation,
                               "client_id": client_id, "content": content});
        if let Some(n) = max_tokens {
            frame["options"] = json!({"max_tokens": n});
        }
        match decode(&frame.to_string()) {
            Ok(ClientFrame::UserMessage { conversation: c, client_id: id, content: got, options }) => {
                prop_assert_eq!(c, conversation);
                prop_assert_eq!(id, client_id);
                prop_assert_eq!(got, content);
                prop_assert_eq!(options.and_then(|o| o.max_tokens), max_tokens);
            }
            other => prop_assert!(false, "{frame} decoded as {other:?}"),
        }
    }

    #[test]
    fn small_frames_round_trip(
        conversation in any::<String>(),
        client_id in any::<String>(),
        after_seq in prop::option::of(any::<u64>()),
        is_error in any::<bool>(),
        content in content(),
    ) {
        let sub = json!({"type": "subscribe", "conversation": conversation, "after_seq": after_seq});
        let ok = matches!(decode(&sub.to_string()),
            Ok(ClientFrame::Subscribe { conversation: ref c, after_seq: a }) if *c == conversation && a == after_seq);
        prop_assert!(ok, "{}", sub);
        let cancel = json!({"type": "cancel", "conversation": conversation});
        let ok = matches!(decode(&cancel.to_string()),
            Ok(ClientFrame::Cancel { conversation: ref c }) if *c == conversation);
        prop_assert!(ok, "{}", cancel);
        let create = json!({"type": "create", "client_id": client_id, "model": conversation});
        let ok = matches!(decode(&create.to_string()),
            Ok(ClientFrame::Create { client_id: ref id, model: Some(ref m), .. })
                if *id == client_id && *m == conversation);
        prop_assert!(ok, "{}", create);
        let result = json!({"type": "tool_result", "conversation": conversation,
            "client_id": client_id, "tool_call_id": client_id, "content": content,
            "is_error": is_error});
        let ok = matches!(decode(&result.to_string()),
            Ok(ClientFrame::ToolResult { content: ref got, is_error: e, .. })
                if *got == content && e == is_error);
        prop_assert!(ok, "{}", result);
    }
}

#[test]
fn deep_nesting_is_refused_not_overflowed() {
    for depth in [200, 10_000, 100_000] {
        for (open, close) in [("[", "]"), ("{\"a\":", "}")] {
            let text = format!(
                "{{\"type\":\"create\",\"client_id\":\"c\",\"metadata\":{}1{}}}",
                open.repeat(depth),
                close.repeat(depth)
            );
            let bad = decode(&text).err();
            assert!(bad.is_some_and(|b| is_typed_refusal(&b)), "depth {depth}");
        }
    }
}
