//! Tool use in the mock's replies: which tools a request gets called, the arguments a JSON schema
//! yields (also the value of a `json_schema` reply), and the reply to tool results. Pure
//! functions the [`generator`](super::generator) drives.

use serde_json::{json, Map, Value};

use super::generator::{
    strip_directives, MockCall, MockChoice, MockRequest, MockTool, ToolDirective,
};

/// The calls `req` gets: none unless tools are offered, the choice allows them and the request
/// does not end with tool results; then what the directive asks for, else what the choice forces.
pub(super) fn calls(
    req: &MockRequest,
    directive: Option<&ToolDirective>,
    last_user: &str,
    hash: u64,
) -> Vec<MockCall> {
    if req.tools.is_empty() || req.choice == MockChoice::None || !req.tool_results.is_empty() {
        return Vec::new();
    }
    let find = |name: &str| req.tools.iter().find(|t| t.name == name);
    let mut picked: Vec<&MockTool> = match directive {
        Some(ToolDirective::First) => match &req.choice {
            MockChoice::Named(name) => find(name).into_iter().collect(),
            _ => req.tools.first().into_iter().collect(),
        },
        Some(ToolDirective::Named(name)) => find(name).into_iter().collect(),
        Some(ToolDirective::Count(n)) => req.tools.iter().take(*n).collect(),
        None => Vec::new(),
    };
    if picked.is_empty() {
        picked = match &req.choice {
            MockChoice::Required => req.tools.first().into_iter().collect(),
            MockChoice::Named(name) => find(name).into_iter().collect(),
            MockChoice::Auto | MockChoice::None => Vec::new(),
        };
    }
    let text = strip_directives(last_user);
    picked
        .into_iter()
        .enumerate()
        .map(|(i, tool)| MockCall {
            id: format!("call_{i}_{:08x}", hash as u32),
            name: tool.name.clone(),
            arguments: arguments(&tool.parameters, &text).to_string(),
        })
        .collect()
}

/// The arguments object for a tool whose parameters are `schema`: one value per property, or
/// `{"input": text}` when the schema has no properties.
pub(super) fn arguments(schema: &Value, text: &str) -> Value {
    match schema.get("properties").and_then(Value::as_object) {
        Some(props) if !props.is_empty() => Value::Object(
            props
                .iter()
                .map(|(k, s)| (k.clone(), property_value(s, text)))
                .collect::<Map<_, _>>(),
        ),
        _ => json!({ "input": text }),
    }
}

/// The value of a `json_schema` reply: an object schema as for arguments; a schema of a scalar
/// or array type (or with an `enum`) gets that property's value.
pub(super) fn schema_value(schema: &Value, text: &str) -> Value {
    let scalar = schema.get("enum").is_some()
        || matches!(
            schema_type(schema),
            Some("string" | "integer" | "number" | "boolean" | "array" | "null")
        );
    if scalar && schema.get("properties").is_none() {
        property_value(schema, text)
    } else {
        arguments(schema, text)
    }
}

fn property_value(schema: &Value, text: &str) -> Value {
    if let Some(first) = schema
        .get("enum")
        .and_then(Value::as_array)
        .and_then(|e| e.first())
    {
        return first.clone();
    }
    match schema_type(schema) {
        Some("integer" | "number") => json!(1),
        Some("boolean") => Value::Bool(true),
        Some("array") => json!([]),
        Some("object") => json!({}),
        Some("null") => Value::Null,
        _ => Value::String(text.to_owned()),
    }
}

/// The schema's `type`; of a list of types (`["string", "null"]`), the first that is not null.
fn schema_type(schema: &Value) -> Option<&str> {
    match schema.get("type") {
        Some(Value::String(t)) => Some(t),
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(Value::as_str)
            .find(|t| *t != "null")
            .or_else(|| ts.first().and_then(Value::as_str)),
        _ => None,
    }
}

/// `Tool results: <c1>; error: <c2>.`, one chunk per word (each after the first with its space).
pub(super) fn results_reply(results: &[(String, bool)]) -> Vec<String> {
    let shown: Vec<String> = results
        .iter()
        .map(|(content, is_error)| {
            if *is_error {
                format!("error: {content}")
            } else {
                content.clone()
            }
        })
        .collect();
    let text = format!("Tool results: {}.", shown.join("; "));
    text.split(' ')
        .enumerate()
        .map(|(i, w)| {
            if i == 0 {
                w.to_owned()
            } else {
                format!(" {w}")
            }
        })
        .collect()
}
