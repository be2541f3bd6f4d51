//! Tool calls in a conversation: which calls of the newest reply still wait for their results.
//! The store is the truth (a restarted actor, or one that crashed between a call and its
//! result, reads the same answer).

use std::collections::HashSet;

use crate::ids::ConversationId;
use crate::store::{Role, Store, StoreError};

/// The ids of the newest reply's tool calls that have no stored result yet, in call order.
///
/// # Errors
/// On a storage failure.
pub fn open_calls(store: &Store, conv: &ConversationId) -> Result<Vec<String>, StoreError> {
    let mut answered = HashSet::new();
    for m in store.messages_newest_first(conv) {
        let m = m?;
        match m.role {
            Role::Tool => {
                if let Some(id) = m.tool_call_id {
                    answered.insert(id);
                }
            }
            Role::Assistant => {
                return Ok(m
                    .tool_calls
                    .into_iter()
                    .map(|c| c.id)
                    .filter(|id| !answered.contains(id))
                    .collect())
            }
            Role::User | Role::System => return Ok(Vec::new()),
        }
    }
    Ok(Vec::new())
}
