//! Function tools: what a request offers, how it lets the model choose, the calls a reply makes
//! and, while a reply streams, the fragments those calls arrive in.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A function tool the model may call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tool {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// JSON schema of the arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// How the model may use the tools.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolChoice {
    Auto,
    None,
    Required,
    /// This function and no other.
    Function(String),
}

/// One call a reply made: `arguments` is the JSON text the model wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

/// A piece of a tool call as it streams: the first piece of call `index` names it (`id`,
/// `name`), the following ones add to its `arguments`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ToolCallDelta {
    pub index: u32,
    pub id: Option<String>,
    pub name: Option<String>,
    pub arguments: String,
}

/// Puts streamed fragments back together into whole calls.
#[derive(Debug, Clone, Default)]
pub struct CallsBuilder {
    calls: Vec<ToolCall>,
}

impl CallsBuilder {
    pub fn push(&mut self, d: &ToolCallDelta) {
        let i = d.index as usize;
        // Indexes come in order from every provider; a gap is filled rather than trusted less.
        while self.calls.len() <= i {
            self.calls.push(ToolCall {
                id: String::new(),
                name: String::new(),
                arguments: String::new(),
            });
        }
        let call = &mut self.calls[i];
        if let Some(id) = &d.id {
            call.id.clone_from(id);
        }
        if let Some(name) = &d.name {
            call.name.push_str(name);
        }
        call.arguments.push_str(&d.arguments);
    }

    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    pub fn calls(&self) -> &[ToolCall] {
        &self.calls
    }

    pub fn finish(self) -> Vec<ToolCall> {
        self.calls
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragments_make_whole_calls() {
        let mut b = CallsBuilder::default();
        let d = |index, id: Option<&str>, name: Option<&str>, args: &str| ToolCallDelta {
            index,
            id: id.map(Into::into),
            name: name.map(Into::into),
            arguments: args.into(),
        };
        b.push(&d(0, Some("c0"), Some("get"), ""));
        b.push(&d(1, Some("c1"), Some("put"), "{\"a\""));
        b.push(&d(0, None, None, "{}"));
        b.push(&d(1, None, None, ":1}"));
        let calls = b.finish();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].arguments, "{}");
        assert_eq!(calls[1].arguments, "{\"a\":1}");
        assert_eq!(calls[1].id, "c1");
    }
}
