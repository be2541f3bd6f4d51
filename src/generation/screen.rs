//! The guard step: the route's and key's guardrails on what a client sends, before anything is
//! stored or sent. Personal data in `block` mode and prompt injections in `block` mode refuse
//! the request; `flag` mode marks it; `redact` mode is applied when the context is built.

use super::Deps;
use crate::error::{ApiError, ErrorCode};
use crate::guard::injection::InjectionMode;
use crate::guard::pii::PiiMode;
use crate::tenant::Principal;

/// What the screen decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Screened {
    /// What to do with personal data in what leaves (`redact` is left to the context step).
    pub pii: PiiMode,
    /// Findings kept with the message (`prompt_injection`).
    pub flags: Vec<String>,
}

/// Screens `new_text` (the new message: injections and personal data) and `context_texts`
/// (everything else the client sent this time: personal data only).
///
/// # Errors
/// `blocked` when a guard in `block` mode finds something.
pub fn screen<'a>(
    deps: &Deps,
    route: &str,
    principal: &Principal,
    new_text: &str,
    context_texts: impl IntoIterator<Item = &'a str>,
) -> Result<Screened, ApiError> {
    let (route_pii, injection) = deps.router.guards(route);
    let pii = principal.pii().unwrap_or(route_pii);
    if pii == PiiMode::Block {
        let mut kinds = crate::guard::pii::detect(new_text);
        for t in context_texts {
            kinds.extend(crate::guard::pii::detect(t));
        }
        kinds.sort_unstable();
        kinds.dedup();
        if !kinds.is_empty() {
            deps.metrics.guard_event("pii", "block");
            let msg = format!("the message contains personal data ({})", kinds.join(", "));
            return Err(ApiError::new(ErrorCode::Blocked, msg));
        }
    }
    let mut flags = Vec::new();
    if injection != InjectionMode::Off {
        let verdict = crate::guard::injection::screen(new_text);
        if verdict.is_injection() {
            tracing::warn!(route, score = verdict.score, signals = ?verdict.signals, "prompt injection");
            if injection == InjectionMode::Block {
                deps.metrics.guard_event("prompt_injection", "block");
                return Err(ApiError::new(
                    ErrorCode::Blocked,
                    "the message looks like a prompt injection",
                ));
            }
            deps.metrics.guard_event("prompt_injection", "flag");
            flags.push("prompt_injection".to_owned());
        }
    }
    Ok(Screened { pii, flags })
}
