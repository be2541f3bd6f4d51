//! Client → server frames (PROTOCOL §5), and their decoding into typed frames or a
//! `bad_request` that names what is wrong.

use serde::Deserialize;

use crate::conversation::messages::TurnOptions;
use crate::domain::Content;
use crate::error::ApiError;
use crate::wire::openai::{FunctionTool, WireToolChoice};

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    Create {
        client_id: String,
        #[serde(default)]
        model: Option<String>,
        #[serde(default)]
        system: Option<String>,
        #[serde(default)]
        prompt: Option<String>,
        #[serde(default)]
        metadata: Option<serde_json::Value>,
        /// `window` or `recall` (parley addition).
        #[serde(default)]
        memory: Option<crate::domain::MemoryMode>,
        /// Function tools offered on every turn, as Chat Completions takes them.
        #[serde(default)]
        tools: Option<Vec<FunctionTool>>,
        #[serde(default)]
        tool_choice: Option<WireToolChoice>,
    },
    /// Changes what the conversation offers on its next turns.
    Update {
        conversation: String,
        #[serde(default)]
        tools: Option<Vec<FunctionTool>>,
        #[serde(default)]
        tool_choice: Option<WireToolChoice>,
    },
    Subscribe {
        conversation: String,
        #[serde(default)]
        after_seq: Option<u64>,
    },
    UserMessage {
        conversation: String,
        client_id: String,
        /// A string, or parts (`text`, `image_url`).
        content: Content,
        #[serde(default)]
        options: Option<TurnOptions>,
    },
    /// The result of one tool call of the newest reply.
    ToolResult {
        conversation: String,
        client_id: String,
        tool_call_id: String,
        content: Content,
        /// The tool failed; `content` says how.
        #[serde(default)]
        is_error: bool,
    },
    Cancel {
        conversation: String,
    },
}

/// A frame that could not be decoded, with whatever ids could be read from it for the answer.
#[derive(Debug)]
pub struct BadFrame {
    pub error: ApiError,
    pub conversation: Option<String>,
    pub client_id: Option<String>,
}

/// Decodes one text frame.
///
/// # Errors
/// [`BadFrame`] for invalid JSON, a missing or unknown `type`, or missing or mistyped fields.
pub fn decode(text: &str) -> Result<ClientFrame, BadFrame> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| BadFrame {
        error: ApiError::bad_request(format!("invalid JSON: {e}")),
        conversation: None,
        client_id: None,
    })?;
    let field = |k: &str| value.get(k).and_then(|v| v.as_str()).map(str::to_owned);
    let (conversation, client_id) = (field("conversation"), field("client_id"));
    if !value.is_object() {
        let error = ApiError::bad_request("a frame must be a JSON object with a \"type\"");
        return Err(BadFrame {
            error,
            conversation,
            client_id,
        });
    }
    if value.get("type").is_none() {
        let error = ApiError::bad_request("missing field `type`");
        return Err(BadFrame {
            error,
            conversation,
            client_id,
        });
    }
    // serde would take `[]` for a struct of options; a field that is an object must be one.
    for key in ["options", "metadata"] {
        if value
            .get(key)
            .is_some_and(|v| !v.is_object() && !v.is_null())
        {
            let error = ApiError::bad_request(format!("{key} must be an object"));
            return Err(BadFrame {
                error,
                conversation,
                client_id,
            });
        }
    }
    serde_json::from_value(value).map_err(|e| BadFrame {
        error: ApiError::bad_request(format!("invalid frame: {e}")),
        conversation,
        client_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_every_type() {
        assert!(matches!(
            decode(r#"{"type":"create","client_id":"c"}"#),
            Ok(ClientFrame::Create { .. })
        ));
        assert!(matches!(
            decode(r#"{"type":"subscribe","conversation":"x","after_seq":3}"#),
            Ok(ClientFrame::Subscribe {
                after_seq: Some(3),
                ..
            })
        ));
        assert!(matches!(
            decode(
                r#"{"type":"user_message","conversation":"x","client_id":"c","content":"hi","options":{"max_tokens":5}}"#
            ),
            Ok(ClientFrame::UserMessage { .. })
        ));
        assert!(matches!(
            decode(r#"{"type":"cancel","conversation":"x"}"#),
            Ok(ClientFrame::Cancel { .. })
        ));
    }

    #[test]
    fn bad_frames_say_why() {
        let msg = |t: &str| decode(t).unwrap_err().error.message;
        assert!(msg("{nope").starts_with("invalid JSON"));
        assert!(msg(r#"{"type":"dance"}"#).contains("unknown variant"));
        assert!(msg(r#"{"conversation":"x"}"#).contains("missing field `type`"));
        assert!(msg(r#"[1]"#).contains("JSON object"));
        let bad =
            decode(r#"{"type":"user_message","conversation":"x","client_id":"c"}"#).unwrap_err();
        assert!(bad.error.message.contains("missing field `content`"));
        assert!(msg(r#"{"type":"user_message","conversation":"x","client_id":"c","content":"hi","options":[]}"#).contains("options must be an object"));
        assert!(msg(r#"{"type":"create","client_id":"c","metadata":1}"#)
            .contains("metadata must be an object"));
        assert_eq!(bad.client_id.as_deref(), Some("c"));
        assert_eq!(bad.conversation.as_deref(), Some("x"));
    }
}

#[cfg(test)]
mod props;
