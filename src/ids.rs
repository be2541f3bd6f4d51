//! Identifier newtypes shared by every layer.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The longest `client_id` accepted, in bytes.
pub const MAX_CLIENT_ID_BYTES: usize = 256;

/// Checks a client-chosen id (`client_id`): not empty, at most [`MAX_CLIENT_ID_BYTES`], no
/// control characters (it is stored, indexed and echoed in every frame of its turn).
///
/// # Errors
/// A message saying what is wrong.
pub fn check_client_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("client_id must not be empty".into());
    }
    if id.len() > MAX_CLIENT_ID_BYTES {
        return Err(format!(
            "client_id is {} bytes; at most {MAX_CLIENT_ID_BYTES} are accepted",
            id.len()
        ));
    }
    if id.chars().any(char::is_control) {
        return Err("client_id must not contain control characters".into());
    }
    Ok(())
}

/// A conversation id chosen by the server: `conv_` and 32 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ConversationId(String);

impl TryFrom<String> for ConversationId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Self::parse(&s).ok_or_else(|| format!("{s:?} is not a conversation id"))
    }
}

impl From<ConversationId> for String {
    fn from(id: ConversationId) -> String {
        id.0
    }
}

impl ConversationId {
    const PREFIX: &'static str = "conv_";
    /// Length in bytes; fixed, so that it can prefix sled keys.
    pub const LEN: usize = 5 + 32;

    pub fn generate() -> Self {
        Self(format!("{}{}", Self::PREFIX, uuid::Uuid::new_v4().simple()))
    }

    /// Accepts only ids of the server's own form; anything else cannot name a conversation.
    pub fn parse(s: &str) -> Option<Self> {
        let hex = s.strip_prefix(Self::PREFIX)?;
        let ok = hex.len() == 32
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        ok.then(|| Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Display for ConversationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The tenant that owns keys, conversations and usage.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TenantId(pub String);

impl TenantId {
    /// The tenant of development mode (no admin key, loopback listener).
    pub fn local() -> Self {
        Self("local".into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Seconds since the Unix epoch, as stored and sent in `created_at`.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_parse_and_others_do_not() {
        let id = ConversationId::generate();
        assert_eq!(id.as_str().len(), ConversationId::LEN);
        assert_eq!(ConversationId::parse(id.as_str()), Some(id));
        for bad in [
            "",
            "conv_",
            "conv_XYZ",
            "conv_0123456789abcdef0123456789ABCDEF",
            "../etc",
        ] {
            assert_eq!(ConversationId::parse(bad), None, "{bad}");
        }
    }
}
