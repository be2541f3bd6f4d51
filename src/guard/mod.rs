//! Guardrails on what leaves for a provider and what comes back: PII redaction ([`pii`]) and
//! prompt-injection screening ([`injection`]). Pure text in, text and findings out.

pub mod injection;
pub mod pii;
