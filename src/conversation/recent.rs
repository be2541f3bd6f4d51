//! `Recent`: the newest messages of one conversation, as many as a turn could ever send, kept by
//! its actor so that a turn does not read and decode its whole history from the store (twice:
//! for the reservation estimate and for the context) on every message.
//!
//! The store stays the truth: `Recent` is read from it when first needed, follows the messages
//! the actor's own turns store, and is dropped (to be read again) after anything it cannot
//! follow. It holds whole groups (PROTOCOL §7: a reply with tool calls and its results), newest
//! last, whose sent cost exceeds the prompt budget — or the whole history when that is less —
//! so trimming over it picks exactly what trimming over the store would.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::domain::Content;
use crate::ids::ConversationId;
use crate::store::{MessageRecord, Role, Store, StoreError};
use crate::tokens::{self, ContextBudget, Kind};

/// The newest messages of a conversation, oldest first.
#[derive(Default)]
pub struct Recent {
    messages: VecDeque<Arc<MessageRecord>>,
    /// What the sent ones cost in the budget (content tokens and framing).
    cost: u64,
    /// How turns sent kept messages with personal data replaced, by seq: the size of the
    /// vault they were replaced with and the content (`None`: nothing was replaced). A vault
    /// only grows, and one of the same size replaces the same way, so a turn replaces only
    /// what is new to it instead of running every detector over the whole history again.
    redacted: Mutex<HashMap<u64, (usize, Option<Content>)>>,
}

impl Clone for Recent {
    fn clone(&self) -> Self {
        Self {
            messages: self.messages.clone(),
            cost: self.cost,
            redacted: Mutex::new(self.redacted.lock().clone()),
        }
    }
}

/// How a stored message groups for trimming.
pub fn kind(m: &MessageRecord) -> Kind {
    match m.role {
        Role::Tool => Kind::Result,
        Role::Assistant if !m.tool_calls.is_empty() => Kind::Calls,
        _ => Kind::Plain,
    }
}

impl Recent {
    /// Reads the newest messages of `conv` from the store: whole groups until they cost more
    /// than `budget`, or all of them.
    ///
    /// # Errors
    /// On a storage failure or a corrupt record.
    pub fn load(
        store: &Store,
        conv: &ConversationId,
        budget: ContextBudget,
    ) -> Result<Self, StoreError> {
        let mut newest_first = Vec::new();
        let mut cost = 0u64;
        let mut group_open = false;
        for m in store.messages_newest_first(conv) {
            let m = m?;
            // Stop at a group boundary once enough is read: the message before a result run
            // (its call) still belongs to the group.
            if cost > u64::from(budget.limit) && !group_open {
                break;
            }
            group_open = match kind(&m) {
                Kind::Result => true,
                Kind::Calls | Kind::Plain => false,
            };
            cost += m.history_cost();
            newest_first.push(Arc::new(m));
        }
        newest_first.reverse();
        Ok(Self {
            messages: newest_first.into(),
            cost,
            redacted: Mutex::default(),
        })
    }

    /// Follows a message the conversation has just stored; forgets the oldest whole groups
    /// once what is kept costs twice the budget (so trimming is rare, and cheap on average).
    pub fn push(&mut self, m: MessageRecord, budget: ContextBudget) {
        if self.messages.back().is_some_and(|last| last.seq >= m.seq) {
            return;
        }
        self.cost += m.history_cost();
        self.messages.push_back(Arc::new(m));
        if self.cost > 2 * u64::from(budget.limit) {
            self.trim(budget);
        }
    }

    /// Keeps the newest whole groups whose sent cost exceeds the budget.
    fn trim(&mut self, budget: ContextBudget) {
        let limit = u64::from(budget.limit);
        let mut kept_cost = 0u64;
        // Index of the oldest message kept.
        let mut first = self.messages.len();
        let sent = self
            .messages
            .iter()
            .enumerate()
            .rev()
            .filter(|(_, m)| m.is_sent());
        for group in tokens::groups(sent, |(_, m)| kind(m)) {
            if kept_cost > limit {
                break;
            }
            kept_cost += group.iter().map(|(_, m)| m.history_cost()).sum::<u64>();
            first = group.last().map_or(first, |(i, _)| *i);
        }
        if kept_cost <= limit {
            return;
        }
        self.messages.drain(..first);
        self.cost = self.messages.iter().map(|m| m.history_cost()).sum();
        let oldest = self.messages.front().map_or(0, |m| m.seq);
        self.redacted.get_mut().retain(|&seq, _| seq >= oldest);
    }

    /// How message `seq` was sent redacted with a vault of `vault_len` values, if it was:
    /// `Some(None)` when nothing was replaced.
    pub fn redacted(&self, seq: u64, vault_len: usize) -> Option<Option<Content>> {
        match self.redacted.lock().get(&seq) {
            Some((len, content)) if *len == vault_len => Some(content.clone()),
            _ => None,
        }
    }

    /// Remembers how message `seq` was sent redacted with a vault of `vault_len` values.
    pub fn keep_redacted(&self, seq: u64, vault_len: usize, content: Option<Content>) {
        // Only for messages kept here (recall also sends older ones).
        if self.messages.front().is_some_and(|m| m.seq <= seq) {
            self.redacted.lock().insert(seq, (vault_len, content));
        }
    }

    /// The messages newest first (sent or not).
    pub fn newest_first(&self) -> impl Iterator<Item = &Arc<MessageRecord>> {
        self.messages.iter().rev()
    }

    /// Whether the newest reply's tool calls may still wait for results: its newest message is
    /// a reply with calls or a result. Otherwise none can be open (the store says the same).
    pub fn calls_may_be_open(&self) -> bool {
        self.messages
            .back()
            .is_some_and(|m| matches!(kind(m), Kind::Calls | Kind::Result))
    }

    /// The seq of the newest message kept (0 when none).
    pub fn last_seq(&self) -> u64 {
        self.messages.back().map_or(0, |m| m.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ToolCall;

    fn msg(seq: u64, role: Role, tokens: u32) -> MessageRecord {
        MessageRecord {
            seq,
            role,
            content: "x".into(),
            tokens,
            ..MessageRecord::default()
        }
    }

    #[test]
    fn keeps_whole_groups_worth_more_than_the_budget() {
        let budget = ContextBudget { limit: 100 };
        let mut r = Recent::default();
        // 36 messages of 10 + 4 framing: trimmed once past 200.
        for seq in 1..=36 {
            r.push(msg(seq, Role::User, 10), budget);
        }
        assert!(r.cost > 100, "more than the budget is kept: {}", r.cost);
        assert!(r.cost <= 200 + 14);
        let oldest = r.messages.front().map(|m| m.seq).unwrap(); // ok: test code
        assert!(oldest > 1, "the oldest were forgotten");
        assert_eq!(r.last_seq(), 36);
        // A message seen before is not added twice.
        r.push(msg(36, Role::User, 10), budget);
        assert_eq!(r.last_seq(), 36);
    }

    #[test]
    fn a_call_is_never_cut_from_its_results() {
        let budget = ContextBudget { limit: 20 };
        let mut r = Recent::default();
        let mut call = msg(1, Role::Assistant, 5);
        call.tool_calls = vec![ToolCall {
            id: "c".into(),
            name: "f".into(),
            arguments: "{}".into(),
        }];
        r.push(call, budget);
        for seq in 2..=8 {
            r.push(msg(seq, Role::Tool, 5), budget);
        }
        // One group (the call and its results): nothing can be dropped.
        assert_eq!(r.messages.front().map(|m| m.seq), Some(1));
        assert!(r.calls_may_be_open());
        r.push(msg(9, Role::Assistant, 5), budget);
        assert!(!r.calls_may_be_open());
    }
}
