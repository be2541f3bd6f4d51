//! References to versioned system prompts: `name@3` pins a version, `name@latest` (or just
//! `name`) takes the newest one at each turn.

use crate::error::{ApiError, ErrorCode};
use crate::store::{PromptVersion, Store};

/// Splits a reference into its name and pinned version (`None`: latest).
///
/// # Errors
/// `bad_request` for an empty name or a version that is neither a number nor `latest`.
pub fn parse(reference: &str) -> Result<(&str, Option<u32>), ApiError> {
    let (name, version) = reference.rsplit_once('@').unwrap_or((reference, "latest"));
    if name.is_empty() {
        return Err(ApiError::bad_request(
            "a prompt reference needs a name: name@version",
        ));
    }
    match version {
        "latest" => Ok((name, None)),
        v => v.parse().map(|n| (name, Some(n))).map_err(|_| {
            ApiError::bad_request(format!(
                "prompt version {v:?} is neither a number nor latest"
            ))
        }),
    }
}

/// The prompt version a reference names now.
///
/// # Errors
/// `not_found` when the prompt or version does not exist; `bad_request` for a bad reference.
pub fn resolve(store: &Store, reference: &str) -> Result<PromptVersion, ApiError> {
    let (name, version) = parse(reference)?;
    store.prompt(name, version)?.ok_or_else(|| {
        ApiError::new(
            ErrorCode::NotFound,
            format!("prompt {reference:?} not found"),
        )
    })
}

impl PromptVersion {
    /// `name@version`, as stored with each reply.
    pub fn label(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        assert_eq!(parse("support@3").unwrap(), ("support", Some(3))); // ok: test code
        assert_eq!(parse("support@latest").unwrap(), ("support", None)); // ok: test code
        assert_eq!(parse("support").unwrap(), ("support", None)); // ok: test code
        assert!(parse("@3").is_err());
        assert!(parse("support@v3").is_err());
    }
}
