//! A chat message: a role, content that is plain text or a list of parts (text, images), and
//! for tool use the calls an assistant made or the call a tool result answers.

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use super::{Role, ToolCall};

/// A message's content: a string, or parts (PROTOCOL §7).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

impl Default for Content {
    fn default() -> Self {
        Self::Text(String::new())
    }
}

/// One part of a message's content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Part {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
}

/// An image by URL: `https:` (or `http:`) to be fetched by the provider, or a `data:` URL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageUrl {
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<Detail>,
}

/// OpenAI's image detail levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Detail {
    Auto,
    Low,
    High,
}

impl ImageUrl {
    /// Checks the URL's scheme and, for a `data:` URL, its shape (`data:image/…;base64,…`).
    ///
    /// # Errors
    /// A message naming what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(rest) = self.url.strip_prefix("data:") {
            let (media, data) = rest
                .split_once(',')
                .ok_or("a data: URL needs a comma before its data")?;
            let media_type = media
                .strip_suffix(";base64")
                .ok_or("a data: URL image must be base64 (data:image/png;base64,...)")?;
            if !media_type.starts_with("image/") {
                return Err(format!("{media_type:?} is not an image media type"));
            }
            if data.is_empty() {
                return Err("the data: URL has no data".into());
            }
            return Ok(());
        }
        if self.url.starts_with("https://") || self.url.starts_with("http://") {
            return Ok(());
        }
        Err("an image URL must be https: or data:".into())
    }

    /// The media type and base64 data of a `data:` URL (`None` for other URLs).
    pub fn data(&self) -> Option<(&str, &str)> {
        let rest = self.url.strip_prefix("data:")?;
        let (media, data) = rest.split_once(',')?;
        Some((media.strip_suffix(";base64")?, data))
    }
}

impl<'de> Deserialize<'de> for Content {
    /// A string or an array of parts; a part of an unknown type or a malformed image is refused
    /// with a message that names it.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::from_value(Value::deserialize(d)?).map_err(D::Error::custom)
    }
}

impl Content {
    /// Reads a string or an array of parts.
    ///
    /// # Errors
    /// A message naming what is wrong, starting with `content` (`content[1]: ...`).
    pub fn from_value(v: Value) -> Result<Self, String> {
        match v {
            Value::String(s) => Ok(Self::Text(s)),
            Value::Null => Ok(Self::default()),
            Value::Array(items) => items
                .into_iter()
                .enumerate()
                .map(|(i, item)| Part::from_value(item).map_err(|e| format!("content[{i}]: {e}")))
                .collect::<Result<Vec<_>, _>>()
                .map(Self::Parts),
            _ => Err("content must be a string or an array of parts".into()),
        }
    }
}

impl Part {
    fn from_value(v: Value) -> Result<Self, String> {
        let kind = v
            .get("type")
            .and_then(Value::as_str)
            .ok_or("a content part needs a \"type\"")?
            .to_owned();
        match kind.as_str() {
            "text" | "image_url" => {}
            other => {
                return Err(format!(
                    "unsupported content part type {other:?} (text and image_url are)"
                ))
            }
        }
        let part: Part = serde_json::from_value(v).map_err(|e| format!("{kind} part: {e}"))?;
        if let Part::ImageUrl { image_url } = &part {
            image_url.validate()?;
        }
        Ok(part)
    }
}

impl Content {
    /// The text of the content: the string, or the text parts joined.
    pub fn text(&self) -> String {
        match self {
            Self::Text(s) => s.clone(),
            Self::Parts(parts) => parts
                .iter()
                .filter_map(|p| match p {
                    Part::Text { text } => Some(text.as_str()),
                    Part::ImageUrl { .. } => None,
                })
                .collect(),
        }
    }

    /// The images of the content, in order.
    pub fn images(&self) -> impl Iterator<Item = &ImageUrl> {
        let parts: &[Part] = match self {
            Self::Text(_) => &[],
            Self::Parts(parts) => parts,
        };
        parts.iter().filter_map(|p| match p {
            Part::ImageUrl { image_url } => Some(image_url),
            Part::Text { .. } => None,
        })
    }

    pub fn has_images(&self) -> bool {
        self.images().next().is_some()
    }

    /// Whether there is neither text nor any image.
    pub fn is_empty(&self) -> bool {
        match self {
            Self::Text(s) => s.is_empty(),
            Self::Parts(parts) => parts.iter().all(|p| match p {
                Part::Text { text } => text.is_empty(),
                Part::ImageUrl { .. } => false,
            }),
        }
    }

    /// Applies `f` to every piece of text (the string, or each text part), in place.
    pub fn map_text(&mut self, mut f: impl FnMut(&str) -> String) {
        match self {
            Self::Text(s) => *s = f(s),
            Self::Parts(parts) => {
                for p in parts {
                    if let Part::Text { text } = p {
                        *text = f(text);
                    }
                }
            }
        }
    }
}

/// One message of a request or of a conversation.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Message {
    pub role: Role,
    pub content: Content,
    /// An assistant message's tool calls.
    pub tool_calls: Vec<ToolCall>,
    /// A tool message's call.
    pub tool_call_id: Option<String>,
    /// A tool result that reports a failure (Anthropic `is_error`).
    pub is_error: bool,
    /// The participant's name (OpenAI's `name`), for OpenAI-compatible targets.
    pub name: Option<String>,
}

impl Message {
    pub fn text(role: Role, text: impl Into<String>) -> Self {
        Self {
            role,
            content: Content::Text(text.into()),
            ..Self::default()
        }
    }

    /// Whether the message carries tools, tool results or images (the cache stays away).
    pub fn is_plain(&self) -> bool {
        self.tool_calls.is_empty() && self.tool_call_id.is_none() && !self.content.has_images()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_reads_strings_and_parts_and_names_bad_parts() {
        let c: Content = serde_json::from_str(r#""hi""#).unwrap(); // ok: test
        assert_eq!(c, Content::Text("hi".into()));
        let c: Content = serde_json::from_str(
            r#"[{"type":"text","text":"a"},{"type":"image_url","image_url":{"url":"https://x/y.png","detail":"low"}}]"#,
        )
        .unwrap(); // ok: test
        assert_eq!(c.text(), "a");
        assert_eq!(c.images().count(), 1);
        let err = serde_json::from_str::<Content>(r#"[{"type":"audio","x":1}]"#).unwrap_err(); // ok: test
        assert!(err.to_string().contains("content[0]"), "{err}");
        assert!(err.to_string().contains("audio"), "{err}");
        let err = serde_json::from_str::<Content>(
            r#"[{"type":"image_url","image_url":{"url":"ftp://x"}}]"#,
        )
        .unwrap_err(); // ok: test
        assert!(err.to_string().contains("https: or data:"), "{err}");
        assert!(serde_json::from_str::<Content>(
            r#"[{"type":"image_url","image_url":{"url":"data:text/plain;base64,aGk="}}]"#
        )
        .is_err());
        assert!(serde_json::from_str::<Content>("3").is_err());
    }

    #[test]
    fn content_serialises_as_it_came() {
        let raw = r#"[{"type":"text","text":"a"},{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}}]"#;
        let c: Content = serde_json::from_str(raw).unwrap(); // ok: test
        assert_eq!(serde_json::to_string(&c).unwrap(), raw); // ok: test
    }
}
